//! A JSON array answered in pieces: a blocking reader hands over batches of items, each is written out and
//! dropped before the next is read, so a long listing holds one batch in memory, not the whole answer.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::http::header::ContentType;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use serde::Serialize;
use tokio::sync::mpsc;

/// Batches written ahead of a slow client.
const AHEAD: usize = 1;

/// Answers 200 with the JSON array of `first` followed by every batch `next` returns, given the batch before
/// it, until `next` returns an empty one. `next` runs on a thread of its own and may block. A failure of
/// `next` (its message is logged) ends the answer early, so the client sees a cut body and not a short list;
/// read the first batch before calling this to turn a failure there into an error status.
pub(super) fn json_array<T, F>(first: Vec<T>, next: F) -> std::io::Result<HttpResponse>
where
    T: Serialize + Send + 'static,
    F: FnMut(&[T]) -> Result<Vec<T>, String> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(AHEAD);
    std::thread::Builder::new()
        .name("flywheel-json-array".to_owned())
        .spawn(move || produce(first, next, &tx))?;
    Ok(HttpResponse::Ok()
        .content_type(ContentType::json())
        .streaming(Batches(rx)))
}

type Piece = Result<Bytes, std::io::Error>;

fn produce<T: Serialize, F: FnMut(&[T]) -> Result<Vec<T>, String>>(
    first: Vec<T>,
    mut next: F,
    tx: &mpsc::Sender<Piece>,
) {
    let mut batch = first;
    let mut open = b'[';
    while !batch.is_empty() {
        let mut bytes = Vec::new();
        for item in &batch {
            bytes.push(open);
            open = b',';
            if let Err(e) = serde_json::to_writer(&mut bytes, item) {
                let _ = tx.blocking_send(Err(std::io::Error::other(e)));
                return;
            }
        }
        if tx.blocking_send(Ok(bytes.into())).is_err() {
            return; // The client went away.
        }
        batch = match next(&batch) {
            Ok(more) => more,
            Err(message) => {
                tracing::warn!(%message, "a listing failed after its first rows were sent; the answer is cut");
                let _ = tx.blocking_send(Err(std::io::Error::other(message)));
                return;
            }
        };
    }
    let close: &'static [u8] = if open == b'[' { b"[]" } else { b"]" };
    let _ = tx.blocking_send(Ok(Bytes::from_static(close)));
}

/// The receiving end, as the body stream actix-web writes out.
struct Batches(mpsc::Receiver<Piece>);

impl futures_core::Stream for Batches {
    type Item = Piece;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Piece>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(first: Vec<u32>, batches: Vec<Result<Vec<u32>, String>>) -> (Vec<u8>, bool) {
        let (tx, mut rx) = mpsc::channel(AHEAD);
        let mut batches = batches.into_iter();
        let producer = std::thread::spawn(move || {
            produce(first, |_: &[u32]| batches.next().unwrap_or(Ok(vec![])), &tx)
        });
        let mut body = Vec::new();
        let mut failed = false;
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Ok(bytes) => body.extend_from_slice(&bytes),
                Err(_) => failed = true,
            }
        }
        producer.join().unwrap();
        (body, failed)
    }

    #[test]
    fn batches_join_into_one_array_and_a_failure_cuts_it() {
        let (body, failed) = collect(vec![1, 2], vec![Ok(vec![3]), Ok(vec![4, 5])]);
        assert!(!failed);
        assert_eq!(
            serde_json::from_slice::<Vec<u32>>(&body).unwrap(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(collect(vec![], vec![]).0, b"[]");
        let (body, failed) = collect(vec![1], vec![Err("the store went away".into())]);
        assert!(failed);
        assert!(
            serde_json::from_slice::<Vec<u32>>(&body).is_err(),
            "a cut answer must not parse as a shorter list"
        );
    }
}
