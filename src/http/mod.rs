//! The HTTP layer: actix-web routes, request/response types and error mapping. Handlers validate input
//! and call the [`Infer`] handle; they never touch tensors.

mod embed;
pub mod error;
mod ops;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{middleware, web, App, HttpResponseBuilder, HttpServer};

use crate::config::Config;
use crate::infer::{Infer, Timings};
use crate::metrics::Metrics;
use crate::model::{LoadOptions, Model, ModelError};
use error::{json_error, ApiError};

/// State shared by every handler.
pub struct AppState {
    /// The configuration the server started with.
    pub config: Config,
    /// The process's metrics.
    pub metrics: Metrics,
    infer: Arc<OnceLock<Infer>>,
}

impl AppState {
    /// The inference handle, once the model has loaded.
    pub fn infer(&self) -> Option<&Infer> {
        self.infer.get()
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener could not be bound or the server failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
    /// The model could not be loaded.
    #[error("model: {0}")]
    Model(#[from] ModelError),
}

/// Registers every route on `cfg`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(ops::health))
        .route("/ready", web::get().to(ops::ready))
        .route("/metrics", web::get().to(ops::metrics))
        .service(
            web::resource("/v1/embed")
                .route(web::post().to(embed::embed))
                .default_service(web::to(method_not_allowed)),
        );
}

async fn method_not_allowed() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path",
    ))
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::not_found("no such endpoint"))
}

/// Records duration and status of every request, labelled by the matched route pattern.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let route = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = uuid::Uuid::new_v4().to_string();
    if let Some(m) = &metrics {
        m.in_flight.inc();
    }
    let result = next.call(req).await;
    if let Some(m) = &metrics {
        m.in_flight.dec();
        let status = match &result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.as_response_error().status_code().as_u16(),
        };
        m.requests
            .with_label_values(&[route.as_str(), &status.to_string()])
            .inc();
        m.request_duration
            .with_label_values(&[route.as_str(), "", ""])
            .observe(started.elapsed().as_secs_f64());
    }
    let mut response = result?;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    Ok(response)
}

/// Adds per-stage timings (milliseconds) as response headers.
pub(crate) fn timing_headers(response: &mut HttpResponseBuilder, t: &Timings) {
    let ms = |d: std::time::Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
    response
        .insert_header(("x-tokenize-time-ms", ms(t.tokenize)))
        .insert_header(("x-queue-time-ms", ms(t.queue)))
        .insert_header(("x-inference-time-ms", ms(t.inference)));
}

/// Binds the listener, loads the model in the background (`/ready` answers 503 until it is loaded), and
/// serves until SIGINT/SIGTERM, draining in-flight requests.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    for file in [
        crate::model::CONFIG_FILE,
        crate::model::TOKENIZER_FILE,
        crate::model::WEIGHTS_FILE,
    ] {
        if !config.model.dir.join(file).is_file() {
            return Err(ModelError::MissingFile {
                dir: config.model.dir.clone(),
                file,
            }
            .into());
        }
    }
    let metrics = Metrics::new();
    let infer = Arc::new(OnceLock::new());
    let state = web::Data::new(AppState {
        config: config.clone(),
        metrics: metrics.clone(),
        infer: infer.clone(),
    });
    let max_body = config.limits.max_body_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(max_body)
                    .error_handler(|e, _| json_error(e).into()),
            )
            .wrap(middleware::from_fn(observe))
            .wrap(middleware::Compress::default())
            .configure(routes)
            .default_service(web::to(not_found))
    })
    .workers(config.server.workers)
    .shutdown_timeout(config.server.shutdown_timeout_secs)
    .bind((config.server.host.as_str(), config.server.port))?;
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
    }
    let server = server.run();
    let handle = server.handle();
    let load_error = Arc::new(OnceLock::new());
    let loader_error = load_error.clone();
    std::thread::Builder::new()
        .name("flywheel-load".to_owned())
        .spawn(move || {
            match load_model(&config, metrics.clone()) {
                Ok(handle) => {
                    let _ = infer.set(handle);
                    metrics.model_ready.set(1);
                    tracing::info!(model = %config.model.dir.display(), "model ready");
                }
                Err(e) => {
                    tracing::error!(error = %e, "model failed to load; stopping");
                    let _ = loader_error.set(e);
                    // Sends the stop command now; nothing needs to wait for it here.
                    drop(handle.stop(false));
                }
            }
        })?;
    server.await?;
    match Arc::try_unwrap(load_error)
        .ok()
        .and_then(|cell| cell.into_inner())
    {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

fn load_model(config: &Config, metrics: Metrics) -> Result<Infer, ModelError> {
    let started = Instant::now();
    let device = crate::model::parse_device(&config.model.device)?;
    let model = Model::load(
        &config.model.dir,
        &LoadOptions {
            max_length: config.model.max_length,
            device,
        },
    )?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), name = %model.name, "model loaded");
    Infer::start(model, &config.batching, metrics)
        .map_err(|e| ModelError::Unsupported(format!("cannot start the model thread: {e}")))
}
