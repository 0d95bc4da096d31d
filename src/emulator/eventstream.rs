//! Encoding the `InvokeWithResponseStream` body: AWS event-stream frames
//! written by `aws-smithy-eventstream`, exactly what the SDKs decode.

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::Bytes;

/// Payload chunks larger than this are split over several events.
pub const MAX_EVENT_PAYLOAD: usize = 128 * 1024;

/// How an invocation ended, as `InvokeComplete` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct InvokeComplete {
    /// Lambda's error type (e.g. `Sandbox.Timedout`), absent on success.
    #[serde(rename = "ErrorCode", skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Human-readable error details.
    #[serde(rename = "ErrorDetails", skip_serializing_if = "Option::is_none")]
    pub error_details: Option<String>,
    /// Base64 log tail, when the caller asked for `Tail`.
    #[serde(rename = "LogResult", skip_serializing_if = "Option::is_none")]
    pub log_result: Option<String>,
}

/// `PayloadChunk` events carrying `data`, split to the event size bound;
/// each piece is copied once, into its event.
pub fn payload_chunks(data: &Bytes) -> Vec<Bytes> {
    (0..data.len())
        .step_by(MAX_EVENT_PAYLOAD)
        .map(|start| {
            let end = (start + MAX_EVENT_PAYLOAD).min(data.len());
            event(
                "PayloadChunk",
                Some("application/octet-stream"),
                data.slice(start..end),
            )
        })
        .collect()
}

/// The final `InvokeComplete` event.
pub fn invoke_complete(complete: &InvokeComplete) -> Bytes {
    let json = serde_json::to_vec(complete).expect("plain struct serialises");
    event("InvokeComplete", Some("application/json"), json.into())
}

fn event(event_type: &str, content_type: Option<&str>, payload: Bytes) -> Bytes {
    let mut message = Message::new(payload)
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String(event_type.to_string().into()),
        ));
    if let Some(ct) = content_type {
        message = message.add_header(Header::new(
            ":content-type",
            HeaderValue::String(ct.to_string().into()),
        ));
    }
    let mut buf = Vec::with_capacity(message.payload().len() + 128);
    write_message_to(&message, &mut buf).expect("writing to a Vec cannot fail");
    buf.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};

    #[test]
    fn events_decode_with_the_sdk_decoder() {
        let mut wire = Vec::new();
        for chunk in payload_chunks(&Bytes::from(vec![7u8; MAX_EVENT_PAYLOAD + 10])) {
            wire.extend_from_slice(&chunk);
        }
        wire.extend_from_slice(&invoke_complete(&InvokeComplete {
            error_code: Some("Sandbox.Timedout".into()),
            ..Default::default()
        }));
        let mut decoder = MessageFrameDecoder::new();
        let mut buf = bytes::BytesMut::from(&wire[..]);
        let mut sizes = Vec::new();
        while let DecodedFrame::Complete(m) = decoder.decode_frame(&mut buf).unwrap() {
            sizes.push(m.payload().len());
        }
        assert_eq!(&sizes[..2], &[MAX_EVENT_PAYLOAD, 10]);
        assert_eq!(sizes.len(), 3);
    }
}
