//! The request size limit of every gRPC method, as a tower layer in front of all services.
//!
//! A gRPC message on the wire starts with a 5-byte prefix: a compression flag and the message
//! length. [`RequestSizeLayer`] reads that prefix from the request body before the service sees
//! the request, and answers a message longer than the limit with `RESOURCE_EXHAUSTED` (the code
//! gRPC defines for "request too large", documented in the .proto header) without reading the
//! rest of it. Left to tonic, the same request would fail with `OUT_OF_RANGE`, which the
//! VICTOR contract reserves for "resume revision no longer retained, re-list".

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tonic::Status;
use tonic::codegen::http::{self, HeaderMap};
use tonic::codegen::{Body, BoxFuture, Service};

/// Length of the gRPC message prefix (flag + big-endian u32 length).
const PREFIX_LEN: usize = 5;

/// The tower layer: wrap the whole tonic router with it.
#[derive(Debug, Clone, Copy)]
pub struct RequestSizeLayer {
    max_bytes: usize,
}

impl RequestSizeLayer {
    /// Refuses request messages longer than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        RequestSizeLayer { max_bytes }
    }
}

impl<S> tower_layer::Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;

    fn layer(&self, inner: S) -> RequestSize<S> {
        RequestSize { inner, max_bytes: self.max_bytes }
    }
}

/// The service [`RequestSizeLayer`] makes.
#[derive(Debug, Clone)]
pub struct RequestSize<S> {
    inner: S,
    max_bytes: usize,
}

/// The answer to a request message of `len` bytes over `max` bytes.
pub fn too_large(len: usize, max: usize) -> Status {
    Status::resource_exhausted(format!(
        "the request message is {len} bytes; this controller accepts at most {max} bytes per message \
         (split the request, e.g. fewer observations per Report)"
    ))
}

impl<S, ResBody> Service<http::Request<tonic::body::Body>> for RequestSize<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // The ready service goes with this call; a fresh clone waits for the next poll_ready.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let max = self.max_bytes;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let peeked = match Peeked::read(body).await {
                Ok(peeked) => peeked,
                Err(status) => return Ok(status.into_http()),
            };
            if let Some(len) = peeked.message_len()
                && len > max
            {
                return Ok(too_large(len, max).into_http());
            }
            inner.call(http::Request::from_parts(parts, tonic::body::Body::new(peeked))).await
        })
    }
}

/// A request body whose first bytes (at least the message prefix, when the body has one) were
/// read ahead; it yields them again, then the rest.
struct Peeked {
    head: Option<Bytes>,
    trailers: Option<HeaderMap>,
    ended: bool,
    rest: tonic::body::Body,
}

impl Peeked {
    /// Reads frames until the message prefix is in (or the body ends).
    async fn read(mut rest: tonic::body::Body) -> Result<Peeked, Status> {
        let mut head = BytesMut::new();
        let mut trailers = None;
        let mut ended = false;
        while head.len() < PREFIX_LEN && trailers.is_none() {
            match std::future::poll_fn(|cx| Pin::new(&mut rest).poll_frame(cx)).await {
                None => {
                    ended = true;
                    break;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => head.extend_from_slice(&data),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Some(Err(status)) => return Err(status),
            }
        }
        Ok(Peeked { head: Some(head.freeze()).filter(|h| !h.is_empty()), trailers, ended, rest })
    }

    /// The length the message prefix announces.
    fn message_len(&self) -> Option<usize> {
        let head = self.head.as_ref()?;
        let prefix: [u8; 4] = head.get(1..PREFIX_LEN)?.try_into().ok()?;
        Some(u32::from_be_bytes(prefix) as usize)
    }
}

impl Body for Peeked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        if let Some(trailers) = self.trailers.take() {
            self.ended = true;
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.trailers.is_none() && (self.ended || self.rest.is_end_stream())
    }
}
