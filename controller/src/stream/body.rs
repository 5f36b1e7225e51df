//! A server-streaming gRPC method answered with messages that are already gRPC-framed (the agents'
//! `Sync`): the request is decoded as tonic would, and the response body hands each message's
//! buffer to the connection as it is — no codec, no per-stream encode buffer (tonic's would keep
//! the capacity of the largest message for the stream's whole life), no copy.
//!
//! The body polls the stream itself ([`super::Pump`]): the stream's loop runs in the task that
//! writes the response. The stream ends with trailers: `grpc-status` 0, or the status it failed
//! with.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body::Frame;
use tonic::Status;
use tonic::codegen::http::{self, HeaderMap, HeaderValue, header};
use tonic::codegen::{Body, StdError};
use tonic::metadata::MetadataMap;

/// Decodes the single request message of a server-streaming call (at most `max_bytes`) into a
/// [`tonic::Request`] with the call's metadata and connection info, as tonic's generated servers do.
pub async fn read_request<T, B>(request: http::Request<B>, max_bytes: usize) -> Result<tonic::Request<T>, Status>
where
    T: prost::Message + Default + Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send,
{
    if let Some(encoding) = request.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        return Err(Status::unimplemented(format!(
            "request compression {encoding:?} is not supported; send uncompressed messages"
        )));
    }
    let (parts, body) = request.into_parts();
    let decoder = tonic::codec::Codec::decoder(&mut tonic_prost::ProstCodec::<(), T>::default());
    let mut messages = tonic::codec::Streaming::new_request(decoder, body, None, Some(max_bytes));
    let message =
        messages.message().await?.ok_or_else(|| Status::invalid_argument("the request carries no message"))?;
    Ok(tonic::Request::from_parts(MetadataMap::from_headers(parts.headers), parts.extensions, message))
}

/// The HTTP response of a stream of gRPC-framed messages.
pub fn response<S>(messages: S) -> http::Response<tonic::body::Body>
where
    S: Stream<Item = Result<Bytes, Status>> + Send + Unpin + 'static,
{
    let mut response = http::Response::new(tonic::body::Body::new(FramedBody { messages, ended: false }));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// The body: one DATA chunk per message, then the trailers.
struct FramedBody<S> {
    messages: S,
    ended: bool,
}

fn trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        trailers.insert("grpc-status", HeaderValue::from(tonic::Code::Internal as i32));
    }
    trailers
}

impl<S> Body for FramedBody<S>
where
    S: Stream<Item = Result<Bytes, Status>> + Send + Unpin + 'static,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(self.messages.poll_next_unpin(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
            Some(Err(status)) => Frame::trailers(trailers(&status)),
            None => Frame::trailers(trailers(&Status::ok(""))),
        };
        self.ended = true;
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn messages_then_trailers() {
        let messages = futures::stream::iter(vec![Ok(Bytes::from_static(b"\0\0\0\0\x01a")), Err(Status::aborted("x"))]);
        let mut body = response(messages).into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"\0\0\0\0\x01a"));
        let last = body.frame().await.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(last.get("grpc-status").unwrap(), "10");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }
}
