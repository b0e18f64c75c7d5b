//! The response body type the proxy serves: a tapped upstream body or a small body of
//! llmtap's own (errors, 404s). An enum, not a box, so the hot path allocates nothing.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::tap::{BoxError, TapBody};

pub enum ProxyBody {
    Tap(Box<TapBody>),
    Full(Full<Bytes>),
}

impl ProxyBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Full::new(b.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Tap(t) => Pin::new(t.as_mut()).poll_frame(cx),
            ProxyBody::Full(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Tap(t) => t.is_end_stream(),
            ProxyBody::Full(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Tap(t) => t.size_hint(),
            ProxyBody::Full(f) => f.size_hint(),
        }
    }
}
