//! What the SFU reads from SDP that webrtc-rs does not tell it: which tracks a publisher's offer
//! still sends (a track removed by renegotiation never ends on the server side), their simulcast
//! rids and header-extension ids; and the small edits it makes to its own descriptions.

/// One `m=` section of an SDP.
struct Section<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Section<'a> {
    fn media(&self) -> &'a str {
        self.lines[0]
            .strip_prefix("m=")
            .and_then(|m| m.split(' ').next())
            .unwrap_or("")
    }

    fn rejected(&self) -> bool {
        self.lines[0].split(' ').nth(1) == Some("0")
    }

    fn attr(&self, name: &str) -> impl Iterator<Item = &'a str> + '_ {
        let prefix = format!("a={name}:");
        self.lines
            .iter()
            .filter_map(move |l| l.strip_prefix(prefix.as_str()))
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.strip_prefix("a=") == Some(flag))
    }

    /// The id this section's track goes by: the track id of `a=msid:<stream> <track>`, or,
    /// without one (clients that are not browsers may leave it out), one made from its mid.
    fn track_id(&self, owner: &str) -> Option<String> {
        match self.attr("msid").find_map(|v| v.split(' ').nth(1)) {
            Some(id) => Some(id.to_owned()),
            None => self.attr("mid").next().map(|mid| mid_track_id(owner, mid)),
        }
    }

    fn sends(&self) -> bool {
        let recv_only = self.has_flag("recvonly") || self.has_flag("inactive");
        !self.rejected() && !recv_only && matches!(self.media(), "audio" | "video")
    }
}

fn sections(sdp: &str) -> Vec<Section<'_>> {
    let mut out: Vec<Section> = Vec::new();
    for line in sdp.lines().map(str::trim_end) {
        if line.starts_with("m=") {
            out.push(Section { lines: vec![line] });
        } else if let Some(s) = out.last_mut() {
            s.lines.push(line);
        }
    }
    out
}

fn section_of<'a>(sdp: &'a str, owner: &str, track_id: &str) -> Option<Section<'a>> {
    sections(sdp)
        .into_iter()
        .find(|s| s.track_id(owner).as_deref() == Some(track_id))
}

/// The id of a track whose section has no `a=msid`: `<owner>-mid<mid>` (unique in its room,
/// as track ids must be: two such publishers use the same mids).
pub fn mid_track_id(owner: &str, mid: &str) -> String {
    format!("{owner}-mid{mid}")
}

/// Ids of the tracks `owner`'s offer still sends.
pub fn sending_track_ids(sdp: &str, owner: &str) -> Vec<String> {
    sections(sdp)
        .iter()
        .filter(|s| s.sends())
        .filter_map(|s| s.track_id(owner))
        .collect()
}

/// Whether the offer sends any audio or video (with or without `a=msid`).
pub fn sends_media(sdp: &str) -> bool {
    sections(sdp).iter().any(Section::sends)
}

/// Whether the offer has a data-channel section that is not rejected.
pub fn has_data_section(sdp: &str) -> bool {
    sections(sdp)
        .iter()
        .any(|s| s.media() == "application" && !s.rejected())
}

/// The simulcast rids a track is sent with (`a=rid:<rid> send`), in SDP order.
pub fn simulcast_rids(sdp: &str, owner: &str, track_id: &str) -> Vec<String> {
    let Some(section) = section_of(sdp, owner, track_id) else {
        return Vec::new();
    };
    section
        .attr("rid")
        .filter_map(|v| {
            let mut parts = v.split(' ');
            let rid = parts.next()?;
            (parts.next() == Some("send")).then(|| rid.to_owned())
        })
        .collect()
}

/// `(uri, id)` of the header extensions the track's section declares (`a=extmap:<id> <uri>`).
pub fn extension_ids(sdp: &str, owner: &str, track_id: &str) -> Vec<(String, u8)> {
    let Some(section) = section_of(sdp, owner, track_id) else {
        return Vec::new();
    };
    section
        .attr("extmap")
        .filter_map(|v| {
            let (id, rest) = v.split_once(' ')?;
            let id = id.split('/').next()?.parse().ok()?;
            let uri = rest.split(' ').next()?;
            Some((uri.to_owned(), id))
        })
        .collect()
}

/// The payload type an RTX format repairs (`apt=<pt>` in its fmtp line).
pub fn rtx_apt(fmtp: &str) -> Option<u8> {
    fmtp.split(';')
        .find_map(|p| p.trim().strip_prefix("apt="))
        .and_then(|v| v.trim().parse().ok())
}

/// The first `a=mid:` of a description (what the server's candidates name as `sdpMid`).
pub fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
        .map(str::to_owned)
}

/// The SDP without its `a=candidate` and `a=end-of-candidates` lines.
pub fn without_candidates(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let attr = line.trim_end();
        if attr.starts_with("a=candidate:") || attr == "a=end-of-candidates" {
            continue;
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
a=extmap:4/sendonly http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\na=sendrecv\r\n\
a=msid:alice a-1\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=extmap:13 urn:3gpp:video-orientation\r\na=sendonly\r\n\
a=msid:alice v-1\r\na=rid:q send\r\na=rid:h send\r\na=rid:f send\r\na=simulcast:send q;h;f\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=inactive\r\na=msid:alice v-old\r\n\
m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=msid:alice v-rejected\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:4\r\n";

    #[test]
    fn finds_the_tracks_still_sent() {
        assert_eq!(sending_track_ids(OFFER, "alice"), ["a-1", "v-1"]);
    }

    #[test]
    fn tells_media_and_data_sections_apart() {
        assert!(sends_media(OFFER) && has_data_section(OFFER));
        let data_only = "v=0\r\nm=audio 9 UDP 111\r\na=recvonly\r\nm=video 0 UDP 96\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";
        assert!(!sends_media(data_only) && has_data_section(data_only));
        let rejected_data = "v=0\r\nm=application 0 UDP/DTLS/SCTP webrtc-datachannel\r\n";
        assert!(!has_data_section(rejected_data));
    }

    #[test]
    fn a_section_without_msid_goes_by_its_mid() {
        let offer = OFFER.replace("a=msid:alice v-1\r\n", "");
        assert_eq!(sending_track_ids(&offer, "alice"), ["a-1", "alice-mid1"]);
        assert_eq!(
            simulcast_rids(&offer, "alice", "alice-mid1"),
            ["q", "h", "f"]
        );
        assert_eq!(
            extension_ids(&offer, "alice", "alice-mid1"),
            [("urn:3gpp:video-orientation".to_owned(), 13)]
        );
    }

    #[test]
    fn reads_simulcast_rids() {
        assert_eq!(simulcast_rids(OFFER, "alice", "v-1"), ["q", "h", "f"]);
        assert!(simulcast_rids(OFFER, "alice", "a-1").is_empty());
        assert!(simulcast_rids(OFFER, "alice", "nope").is_empty());
    }

    #[test]
    fn reads_extension_ids_per_track() {
        assert_eq!(
            extension_ids(OFFER, "alice", "a-1"),
            [
                ("urn:ietf:params:rtp-hdrext:ssrc-audio-level".to_owned(), 1),
                (
                    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
                        .to_owned(),
                    4
                )
            ]
        );
        assert_eq!(
            extension_ids(OFFER, "alice", "v-1"),
            [("urn:3gpp:video-orientation".to_owned(), 13)]
        );
    }

    #[test]
    fn candidates_are_removed_from_an_offer() {
        let sdp = "v=0\r\nm=audio 9 UDP 111\r\na=mid:0\r\na=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\na=end-of-candidates\r\na=sendrecv\r\n";
        assert_eq!(
            without_candidates(sdp),
            "v=0\r\nm=audio 9 UDP 111\r\na=mid:0\r\na=sendrecv\r\n"
        );
        assert_eq!(first_mid(sdp).as_deref(), Some("0"));
        assert_eq!(first_mid(OFFER).as_deref(), Some("0"));
        assert_eq!(first_mid("v=0\r\n"), None);
        assert_eq!(rtx_apt("apt=96"), Some(96));
        assert_eq!(rtx_apt("rtx-time=3000; apt=102"), Some(102));
        assert_eq!(rtx_apt("apt=x"), None);
    }

    #[test]
    fn garbage_yields_nothing() {
        assert!(sending_track_ids("not an sdp\r\nm=\r\na=msid:", "u").is_empty());
        assert!(extension_ids("m=audio 9\r\na=extmap:x y\r\na=msid:s t", "u", "t").is_empty());
    }
}
