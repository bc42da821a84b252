//! An interceptor that lets chosen inbound RTCP reach the application.
//!
//! rtc 0.21 consumes inbound RTCP inside its interceptor chain unless an interceptor marks it
//! `DeliverToApplication`; an SFU must see keyframe requests to relay them to the publisher.
//! It sits last in the chain, so any built-in interceptor still sees every packet first. Test
//! clients use it to see all the feedback the server sends them.

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;

/// Where it sits in the chain: after the built-in interceptors, closest to the application.
pub const SLOT: u16 = 14_000;

pub struct RtcpToApp {
    wanted: fn(&dyn rtc::rtcp::Packet) -> bool,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

/// PLI and FIR: what the server relays to publishers.
pub fn is_keyframe_request(p: &dyn rtc::rtcp::Packet) -> bool {
    let any = p.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// What the server's receive path needs from a publisher (for its receiver reports).
pub fn is_sender_report(p: &dyn rtc::rtcp::Packet) -> bool {
    p.as_any().is::<SenderReport>()
}

/// What the server acts on from a subscriber: keyframe requests (relayed upstream) and NACKs
/// (answered from its own retransmission buffer, as forwarded packets bypass the interceptors).
pub fn is_subscriber_feedback(p: &dyn rtc::rtcp::Packet) -> bool {
    is_keyframe_request(p) || p.as_any().is::<TransportLayerNack>()
}

impl RtcpToApp {
    pub fn new(wanted: fn(&dyn rtc::rtcp::Packet) -> bool) -> Self {
        RtcpToApp {
            wanted,
            read: VecDeque::new(),
            write: VecDeque::new(),
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtcpToApp {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let requests: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| (self.wanted)(p.as_ref()))
                .cloned()
                .collect();
            if requests.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(requests);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for RtcpToApp {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}
