//! Response bodies that report to their connection's [`Activity`]: on HTTP/1 the end of a
//! response (the wait for the next head begins, [`Answered`]), on HTTP/2 a chunk that flow
//! control holds back ([`Watched`]). [`Reporting`] wraps [`Proxy::handle`]'s future so that
//! its response carries such a body.
//!
//! [`Proxy::handle`]: crate::proxy::Proxy::handle

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::tracked::{Activity, Cycle};
use crate::proxy::body::Body;
use crate::proxy::Handling;

/// A response body that reports to its connection's [`Activity`].
pub(super) trait Reports {
    fn new(body: Body, activity: Arc<Activity>) -> Self;
}

/// [`Proxy::handle`](crate::proxy::Proxy::handle)'s future, its response's body wrapped as a
/// `B` that reports to the connection's [`Activity`].
pub(super) struct Reporting<B> {
    handling: Handling,
    activity: Option<Arc<Activity>>,
    body: PhantomData<fn() -> B>,
}

impl<B> Reporting<B> {
    pub(super) fn new(handling: Handling, activity: Arc<Activity>) -> Self {
        Reporting {
            handling,
            activity: Some(activity),
            body: PhantomData,
        }
    }
}

impl<B: Reports> std::future::Future for Reporting<B> {
    type Output = Result<hyper::Response<B>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let resp = match std::task::ready!(Pin::new(&mut this.handling).poll(cx)) {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        let activity = this
            .activity
            .take()
            .expect("hyper polls a service future only until it is ready");
        Poll::Ready(Ok(resp.map(|body| B::new(body, activity))))
    }
}

/// An HTTP/1 response body that, once hyper is done with it (all sent, or given up), marks
/// its connection as waiting for the next request head ([`Cycle::Waiting`]). hyper reads the
/// next head only after that, so bytes it reads before (a request body, or a pipelined head
/// read ahead) start no head.
pub(super) struct Answered {
    body: Body,
    activity: Arc<Activity>,
}

impl Reports for Answered {
    fn new(body: Body, activity: Arc<Activity>) -> Self {
        Answered { body, activity }
    }
}

impl HttpBody for Answered {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answered {
    fn drop(&mut self) {
        self.activity.set_cycle(Cycle::Waiting);
    }
}

/// An HTTP/2 response body that tells its connection's [`Activity`] when hyper holds a chunk
/// of it without asking for the next: hyper takes the next chunk only once the last one has
/// send window, so a body left holding is a response that flow control stopped (the client's
/// stream or connection window is spent), with no write refused. Each chunk taken counts as
/// progress.
pub(super) struct Watched {
    body: Body,
    activity: Arc<Activity>,
    /// The last poll handed out a chunk (counted in `Activity::held`).
    holding: bool,
}

impl Reports for Watched {
    fn new(body: Body, activity: Arc<Activity>) -> Self {
        Watched {
            body,
            activity,
            holding: false,
        }
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.body).poll_frame(cx);
        let data = matches!(&res, Poll::Ready(Some(Ok(f))) if f.is_data());
        if data {
            this.activity.taken.fetch_add(1, Ordering::Relaxed);
        }
        if data != this.holding {
            this.holding = data;
            if data {
                this.activity.held.fetch_add(1, Ordering::Relaxed);
            } else {
                this.activity.held.fetch_sub(1, Ordering::Relaxed);
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.holding {
            self.activity.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
