//! A deadline on reading a request's body: a client that sends its body a byte at a time would otherwise
//! hold a connection, and a buffer of up to `[limits] max_body_bytes`, for as long as it likes (actix times
//! out only the request head).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::HttpMessage;
use futures_core::Stream;

use super::AppState;

/// The body stream of a request, cut off with a timed-out error once `sleep` ends.
struct Deadline {
    inner: Payload,
    sleep: Pin<Box<tokio::time::Sleep>>,
    after: Duration,
}

impl Stream for Deadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            let message = format!(
                "the request body did not arrive within {} s (server.body_timeout_secs)",
                self.after.as_secs()
            );
            return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                message,
            )))));
        }
        Poll::Pending
    }
}

/// Middleware: gives the request's body `[server] body_timeout_secs` from now to arrive whole.
pub(super) async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let after = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.config.server.body_timeout_secs)
        .unwrap_or(0);
    if after > 0 {
        let after = Duration::from_secs(after);
        let inner = req.take_payload();
        let timed = Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep(after)),
            after,
        };
        req.set_payload(Payload::from(
            Box::pin(timed) as Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>
        ));
    }
    next.call(req).await
}
