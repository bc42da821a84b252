//! The patches in vendor/ (vendor/rtc/PATCH.md) that the other tests do not reach directly.

use bytes::{Bytes, BytesMut};
use rtc::shared::marshal::Marshal;
use rtc::srtp::context::Context;
use rtc::srtp::option::srtp_replay_protection;
use rtc::srtp::protection_profile::ProtectionProfile;

fn context(profile: ProtectionProfile, replay: bool) -> Context {
    let crypto = rtc::crypto::default_provider().unwrap();
    let key = vec![3u8; profile.key_len()];
    let salt = vec![4u8; profile.salt_len()];
    let replay = replay.then(|| srtp_replay_protection(64));
    Context::new(&key, &salt, profile, replay, None, crypto.crypto()).unwrap()
}

/// An RTP packet with CSRCs and a header extension, so that the header length read from the
/// bytes is exercised.
fn plain(seq: u16) -> Vec<u8> {
    let mut header = rtc::rtp::header::Header {
        version: 2,
        marker: seq.is_multiple_of(2),
        payload_type: 96,
        sequence_number: seq,
        timestamp: 90_000 + seq as u32,
        ssrc: 0x0102_0304,
        csrc: vec![7, 8],
        ..Default::default()
    };
    header
        .set_extension(1, Bytes::from_static(&[0xAA, 0xBB]))
        .unwrap();
    let packet = rtc::rtp::packet::Packet {
        header,
        payload: Bytes::from(vec![seq as u8; 300]),
    };
    packet.marshal().unwrap().to_vec()
}

/// rtc-srtp: decrypting in the datagram's own buffer gives what `decrypt_rtp` gives, for both
/// profiles and across a sequence-number wrap (the rollover counter).
#[test]
fn in_place_decryption_matches_decrypt_rtp() {
    for profile in [
        ProtectionProfile::AeadAes128Gcm,
        ProtectionProfile::Aes128CmHmacSha1_80,
    ] {
        let (mut sender, mut theirs, mut ours) = (
            context(profile, false),
            context(profile, true),
            context(profile, true),
        );
        for seq in (65_530..=65_535).chain(0..6) {
            let plain = plain(seq);
            let protected = sender.encrypt_rtp(&plain).unwrap();
            let expected = theirs.decrypt_rtp(&protected).unwrap();
            let mut buf = BytesMut::from(&protected[..]);
            ours.decrypt_rtp_in_place(&mut buf).unwrap();
            assert_eq!(&buf[..], &expected[..], "{profile:?} seq {seq}");
            assert_eq!(&buf[..], &plain[..], "{profile:?} seq {seq}");
        }
    }
}

/// A forged or truncated packet is refused without moving the replay window; a replay of an
/// accepted packet is refused.
#[test]
fn in_place_decryption_refuses_forgeries_and_replays() {
    for profile in [
        ProtectionProfile::AeadAes128Gcm,
        ProtectionProfile::Aes128CmHmacSha1_80,
    ] {
        let (mut sender, mut receiver) = (context(profile, false), context(profile, true));
        let first = sender.encrypt_rtp(&plain(10)).unwrap();
        let second = sender.encrypt_rtp(&plain(11)).unwrap();
        let mut forged = BytesMut::from(&second[..]);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(
            receiver.decrypt_rtp_in_place(&mut forged).is_err(),
            "{profile:?}"
        );
        for n in [0, 5, 12, 20] {
            let mut short = BytesMut::from(&second[..n]);
            assert!(
                receiver.decrypt_rtp_in_place(&mut short).is_err(),
                "{profile:?} {n}"
            );
        }
        // The genuine packet still decrypts: the forgery did not use up its index.
        let mut genuine = BytesMut::from(&second[..]);
        receiver.decrypt_rtp_in_place(&mut genuine).unwrap();
        let mut earlier = BytesMut::from(&first[..]);
        receiver.decrypt_rtp_in_place(&mut earlier).unwrap();
        let mut replayed = BytesMut::from(&second[..]);
        assert!(
            receiver.decrypt_rtp_in_place(&mut replayed).is_err(),
            "{profile:?} replay"
        );
    }
}

/// rtc-srtp: a stream's state can be forgotten; the same SSRC then starts afresh (its replay
/// window too), and the context holds nothing more for it.
#[test]
fn a_streams_state_can_be_removed() {
    let profile = ProtectionProfile::AeadAes128Gcm;
    let (mut sender, mut receiver) = (context(profile, false), context(profile, true));
    let packet = sender.encrypt_rtp(&plain(40_000)).unwrap();
    let mut first = BytesMut::from(&packet[..]);
    receiver.decrypt_rtp_in_place(&mut first).unwrap();
    assert_eq!(receiver.srtp_ssrcs(), 1);
    let mut replayed = BytesMut::from(&packet[..]);
    assert!(receiver.decrypt_rtp_in_place(&mut replayed).is_err());
    receiver.remove_ssrc(0x0102_0304);
    assert_eq!(receiver.srtp_ssrcs(), 0);
    // A stream starting again at a low sequence number is not taken for a replay or for a
    // rollover of the old one.
    let mut fresh_sender = context(profile, false);
    let mut again = BytesMut::from(&fresh_sender.encrypt_rtp(&plain(5)).unwrap()[..]);
    receiver.decrypt_rtp_in_place(&mut again).unwrap();
    assert_eq!(&again[..], &plain(5)[..]);
}
