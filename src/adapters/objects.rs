//! Generation files in an object store (`[store] objects_url`): a local directory (`file:///…`) or an
//! S3-compatible bucket (`s3://bucket/prefix`, credentials and endpoint from the usual `AWS_*` variables).
//! Each generation is stored once under its content id, `generations/<id>/`, and never changed, so any
//! replica can fetch it into its own adapter directory, which becomes a cache.
//!
//! A generation's files are written first and its `MANIFEST.json` (names, sizes, SHA-256) last: a
//! generation without a manifest is incomplete and is not fetched. Files are fetched into a temporary
//! directory beside their place, checked against the manifest, and renamed into place whole.

use std::path::Path;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::RegistryError;

const MANIFEST: &str = "MANIFEST.json";

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    name: String,
    bytes: u64,
    sha256: String,
}

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(format!("object store: {e}"))
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A file name the manifest may name: one plain component.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// The object store behind `[store] objects_url`, with the runtime its client needs.
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// Where generations live in the store.
    root: ObjectPath,
    /// The store's client is asynchronous; the registry calls it from its own (blocking) threads.
    runtime: tokio::runtime::Runtime,
    /// What `describe` shows: the URL without credentials.
    url: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").field("url", &self.url).finish()
    }
}

impl Objects {
    /// Opens the store at `url`: `file:///absolute/dir` (created if missing) or `s3://bucket[/prefix]`,
    /// configured by this process's `AWS_*` environment variables.
    pub fn open(url: &str) -> Result<Self, RegistryError> {
        Self::open_with(url, std::env::vars())
    }

    /// The store `[store] objects_url` names, or `None` when it is empty (generations stay on the disk).
    pub fn configured(url: &str) -> Result<Option<Self>, RegistryError> {
        match url.trim() {
            "" => Ok(None),
            url => Self::open(url).map(Some),
        }
    }

    /// [`Self::open`] with the variables `vars` in place of the environment: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` (an S3-compatible server),
    /// `AWS_ALLOW_HTTP`, and the rest `object_store` reads.
    pub fn open_with(
        url: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, RegistryError> {
        let parsed = url::Url::parse(url).map_err(|e| {
            RegistryError::Invalid(format!("store.objects_url {url:?} is not a URL: {e}"))
        })?;
        let (store, root): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "file" => {
                let dir = parsed.to_file_path().map_err(|()| {
                    RegistryError::Invalid(format!(
                        "store.objects_url {url:?} must name an absolute local directory"
                    ))
                })?;
                std::fs::create_dir_all(&dir).map_err(storage)?;
                let local =
                    object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(storage)?;
                (Arc::new(local), String::new())
            }
            "s3" => {
                // Bounded, so a stalled store holds up a replica's registry thread for seconds, not minutes
                // (the defaults allow 30 s a request and ten retries over three minutes).
                let retry = object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: std::time::Duration::from_secs(30),
                    ..Default::default()
                };
                let client = object_store::ClientOptions::new()
                    .with_connect_timeout(std::time::Duration::from_secs(5))
                    .with_timeout(std::time::Duration::from_secs(20));
                // The client options first: the variables below adjust them (AWS_ALLOW_HTTP).
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_client_options(client)
                    .with_retry(retry);
                for (key, value) in vars {
                    if let Some(Ok(key)) = key
                        .starts_with("AWS_")
                        .then(|| key.to_ascii_lowercase().parse())
                    {
                        builder = builder.with_config(key, value);
                    }
                }
                let bucket = parsed.host_str().unwrap_or_default();
                let s3 = builder.with_bucket_name(bucket).build().map_err(storage)?;
                (Arc::new(s3), parsed.path().trim_matches('/').to_owned())
            }
            other => {
                return Err(RegistryError::Invalid(format!(
                    "store.objects_url scheme {other:?} is not supported: use file:// or s3://"
                )))
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("flywheel-objects")
            .enable_all()
            .build()
            .map_err(storage)?;
        let mut shown = parsed.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        Ok(Self {
            store,
            root: ObjectPath::from(root).child("generations"),
            runtime,
            url: shown.to_string(),
        })
    }

    /// The store's URL, without credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn object(&self, id: &str, name: &str) -> ObjectPath {
        self.root.child(id).child(name)
    }

    /// Whether the store holds generation `id` whole (its manifest is there).
    pub fn contains(&self, id: &str) -> Result<bool, RegistryError> {
        self.runtime
            .block_on(self.store.head(&self.object(id, MANIFEST)))
            .map(|_| true)
            .or_else(|e| match e {
                object_store::Error::NotFound { .. } => Ok(false),
                e => Err(storage(e)),
            })
    }

    /// Stores `files` (name, content) as generation `id`, unless the store holds it already. The caller
    /// passes the bytes it hashed into the id, so what is stored is what the id names.
    pub fn upload(&self, id: &str, files: &[(&str, &[u8])]) -> Result<(), RegistryError> {
        if self.contains(id)? {
            return Ok(());
        }
        self.runtime.block_on(async {
            let mut manifest = Vec::new();
            for &(name, bytes) in files {
                manifest.push(ManifestFile {
                    name: name.to_owned(),
                    bytes: bytes.len() as u64,
                    sha256: hex_sha256(bytes),
                });
                self.store
                    .put(&self.object(id, name), PutPayload::from(bytes.to_vec()))
                    .await
                    .map_err(storage)?;
            }
            let manifest = serde_json::to_vec(&Manifest { files: manifest }).map_err(storage)?;
            self.store
                .put(&self.object(id, MANIFEST), PutPayload::from(manifest))
                .await
                .map_err(storage)?;
            Ok(())
        })
    }

    /// Fetches generation `id` into `dir` (which must not exist yet), refusing files over `max_bytes` or
    /// that differ from the manifest.
    pub fn download(&self, id: &str, dir: &Path, max_bytes: u64) -> Result<(), RegistryError> {
        let parent = dir
            .parent()
            .ok_or_else(|| storage(format!("{} has no parent", dir.display())))?;
        let partial = Partial(parent.join(format!(".fetching-{}", uuid::Uuid::new_v4().simple())));
        std::fs::create_dir_all(&partial.0).map_err(storage)?;
        self.runtime.block_on(async {
            let manifest = match self.store.get(&self.object(id, MANIFEST)).await {
                Ok(got) => got.bytes().await.map_err(storage)?,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(storage(format!(
                        "generation {id} is not in the store (yet)"
                    )))
                }
                Err(e) => return Err(storage(e)),
            };
            let manifest: Manifest = serde_json::from_slice(&manifest)
                .map_err(|e| storage(format!("{id}/{MANIFEST}: {e}")))?;
            for file in &manifest.files {
                if !plain_file_name(&file.name) || file.bytes > max_bytes {
                    return Err(storage(format!(
                        "{id}/{MANIFEST} names {:?} of {} bytes, which is refused",
                        file.name, file.bytes
                    )));
                }
                let bytes = self
                    .store
                    .get(&self.object(id, &file.name))
                    .await
                    .map_err(storage)?
                    .bytes()
                    .await
                    .map_err(storage)?;
                if bytes.len() as u64 != file.bytes || hex_sha256(&bytes) != file.sha256 {
                    return Err(storage(format!(
                        "{id}/{} differs from its manifest",
                        file.name
                    )));
                }
                crate::durable::write_atomically(&partial.0.join(&file.name), &bytes)
                    .map_err(storage)?;
            }
            Ok(())
        })?;
        std::fs::rename(&partial.0, dir).map_err(storage)
    }
}

/// A directory being fetched into; removed unless it was renamed into place.
struct Partial(std::path::PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// For the test suites: a new bucket on the S3-compatible server at `FLYWHEEL_TEST_S3_ENDPOINT` (which
/// `scripts/test.sh` starts and sets), as an `objects_url` and the `AWS_*` variables that reach it. `None`,
/// with a note on stderr, when the variable is unset, unless `FLYWHEEL_TEST_S3_REQUIRED` is set, when it
/// panics.
pub fn test_bucket() -> Option<(String, Vec<(String, String)>)> {
    use std::io::{Read, Write};
    let endpoint =
        crate::testenv::service("FLYWHEEL_TEST_S3_ENDPOINT", "FLYWHEEL_TEST_S3_REQUIRED")?;
    let bucket = format!("flywheel-{}", uuid::Uuid::new_v4().simple());
    // The test server takes an unsigned bucket creation: one plain HTTP request.
    let host = endpoint
        .strip_prefix("http://")
        .expect("FLYWHEEL_TEST_S3_ENDPOINT is http://host:port");
    let mut stream = std::net::TcpStream::connect(host).expect("the test S3 server");
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("a request to the test S3 server");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "bucket {bucket} not created: {answer}"
    );
    let vars = [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "flywheel-test"),
        ("AWS_SECRET_ACCESS_KEY", "flywheel-test"),
        ("AWS_REGION", "us-east-1"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec();
    Some((format!("s3://{bucket}/flywheel"), vars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_goes_up_once_and_comes_down_whole_and_checked() {
        let (store, local) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let url = format!("file://{}", store.path().display());
        let objects = Objects::open(&url).unwrap();
        let weights = vec![7u8; 1000];
        assert!(!objects.contains("g-1").unwrap());
        objects
            .upload("g-1", &[("a.json", b"{}"), ("b.bin", &weights)])
            .unwrap();
        assert!(objects.contains("g-1").unwrap());
        let fetched = local.path().join("cache/published");
        objects.download("g-1", &fetched, 10_000).unwrap();
        assert_eq!(std::fs::read(fetched.join("b.bin")).unwrap(), weights);
        assert_eq!(std::fs::read(fetched.join("a.json")).unwrap(), b"{}");

        // Stored once: a second upload of the same id leaves the objects as they are.
        objects.upload("g-1", &[("b.bin", b"changed")]).unwrap();
        let again = local.path().join("again");
        objects.download("g-1", &again, 10_000).unwrap();
        assert_eq!(std::fs::read(again.join("b.bin")).unwrap().len(), 1000);

        // Refused: over the size limit, a file changed in the store, an unknown generation; nothing is left
        // behind.
        let e = objects
            .download("g-1", &local.path().join("small"), 100)
            .unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        std::fs::write(store.path().join("generations/g-1/b.bin"), b"tampered").unwrap();
        let e = objects
            .download("g-1", &local.path().join("bad"), 10_000)
            .unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
        let e = objects
            .download("g-2", &local.path().join("none"), 10_000)
            .unwrap_err();
        assert!(e.to_string().contains("not in the store"), "{e}");
        for gone in ["small", "bad", "none"] {
            assert!(!local.path().join(gone).exists());
        }
        let leftovers = std::fs::read_dir(local.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".fetching")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn a_generation_goes_through_an_s3_compatible_server() {
        let Some((url, vars)) = test_bucket() else {
            return;
        };
        let objects = Objects::open_with(&url, vars).unwrap();
        let local = tempfile::tempdir().unwrap();
        let weights: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        objects.upload("g-s3", &[("w.bin", &weights)]).unwrap();
        assert!(objects.contains("g-s3").unwrap());
        let fetched = local.path().join("fetched");
        objects.download("g-s3", &fetched, 1 << 20).unwrap();
        assert_eq!(std::fs::read(fetched.join("w.bin")).unwrap(), weights);
        let e = objects
            .download("g-none", &local.path().join("none"), 1 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("not in the store"), "{e}");
    }

    #[test]
    fn only_file_and_s3_urls_are_taken() {
        for bad in ["ftp://host/x", "not a url", "file://relative"] {
            assert!(Objects::open(bad).is_err(), "{bad}");
        }
        let shown = Objects::open("s3://user:secret@bucket/prefix").unwrap();
        assert!(!shown.url().contains("secret"), "{}", shown.url());
    }
}
