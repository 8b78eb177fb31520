//! The HTTP layer: actix-web routes, request/response types and error mapping. Handlers parse, authorise
//! and format, and call the [`Services`]; they never touch tensors.

pub mod adapters;
mod auth;
mod deadline;
mod drift;
pub mod embed;
pub mod error;
pub mod feedback;
pub mod openai;
pub mod openapi;
mod ops;
pub mod predict;
pub mod rollouts;
mod stream;
pub mod tasks;
pub mod tei;
pub mod train;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{middleware, web, App, HttpResponseBuilder, HttpServer};

use crate::config::Config;
use crate::infer::{Infer, Timings};
use crate::metrics::Metrics;
pub use crate::serving::Services;
use error::{json_error, ApiError};

/// State shared by every handler.
pub struct AppState {
    /// The configuration the server started with.
    pub config: Config,
    /// The process's metrics.
    pub metrics: Metrics,
    services: Arc<OnceLock<Services>>,
}

impl AppState {
    /// The state of a server whose services are already loaded.
    pub fn loaded(config: Config, metrics: Metrics, services: Services) -> Self {
        Self {
            config,
            metrics,
            services: Arc::new(OnceLock::from(services)),
        }
    }

    /// The inference handle, once the model has loaded.
    pub fn infer(&self) -> Option<&Infer> {
        self.services.get().map(|s| &s.infer)
    }

    /// The loaded services, or 503 while the model loads.
    pub fn services(&self) -> Result<&Services, ApiError> {
        self.services.get().ok_or_else(ApiError::not_ready)
    }
}

/// Labels a handler attaches to its response for the request-duration histogram.
#[derive(Debug, Clone)]
pub(crate) struct RouteLabels {
    pub task: String,
    pub arm: String,
}

pub use crate::app::ServeError;

/// What a process answers over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `flywheel serve`: the whole API.
    Api,
    /// `flywheel worker`: trains jobs from the shared queue and answers only `/health`, `/ready` and
    /// `/metrics`, for its orchestrator's probes and Prometheus.
    Worker,
}

/// Registers the routes a worker answers: liveness, readiness, metrics.
fn ops_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(ops::health)))
        .service(resource("/ready").route(web::get().to(ops::ready)))
        .service(resource("/metrics").route(web::get().to(ops::metrics)));
}

/// Registers every route on `cfg`; bodies of the OpenAI-style routes are limited to `max_body` bytes and
/// their errors answered in OpenAI's shape.
pub fn routes(cfg: &mut web::ServiceConfig, max_body: usize) {
    let openai = |path| openai_resource(path).app_data(openai::json_config(max_body));
    ops_routes(cfg);
    cfg.service(resource("/openapi.json").route(web::get().to(ops::openapi)))
        .service(resource("/v1/embed").route(web::post().to(embed::embed)))
        .service(resource("/v1/predict").route(web::post().to(predict::predict)))
        .service(openai("/v1/embeddings").route(web::post().to(openai::embeddings)))
        .service(openai("/v1/classify").route(web::post().to(openai::classify)))
        // The paths other clients post to (`openapi::ALIASES`, which documents them).
        .service(openai("/classify").route(web::post().to(openai::classify)))
        .service(resource("/").route(web::post().to(tei::embed)))
        .service(openai_resource("/v1/models").route(web::get().to(openai::models)))
        // A model id may hold a slash (`sentence-transformers/all-MiniLM-L6-v2`), which older OpenAI SDKs
        // send unencoded.
        .service(openai_resource("/v1/models/{model:.+}").route(web::get().to(openai::model)))
        .service(resource("/embed").route(web::post().to(tei::embed)))
        .service(resource("/predict").route(web::post().to(tei::predict)))
        .service(resource("/tokenize").route(web::post().to(tei::tokenize)))
        .service(resource("/info").route(web::get().to(tei::info)))
        .service(
            resource("/v1/tasks")
                .route(web::post().to(tasks::create))
                .route(web::get().to(tasks::list)),
        )
        .service(
            resource("/v1/feedback")
                .route(web::post().to(feedback::post))
                .route(web::get().to(feedback::list)),
        )
        .service(resource("/v1/train").route(web::post().to(train::submit)))
        .service(resource("/v1/jobs").route(web::get().to(train::list)))
        .service(
            resource("/v1/jobs/{id}")
                .route(web::get().to(train::get))
                .route(web::delete().to(train::cancel)),
        )
        .service(resource("/v1/tasks/{name}").route(web::get().to(tasks::get)))
        .service(
            resource("/v1/adapters")
                .route(web::get().to(adapters::list))
                .route(web::post().to(adapters::load)),
        )
        .service(resource("/v1/adapters/{id}").route(web::delete().to(adapters::delete)))
        .service(
            resource("/v1/aliases/{alias}")
                .route(web::put().to(adapters::set_alias))
                .route(web::delete().to(adapters::delete_alias)),
        )
        .service(
            resource("/v1/rollouts")
                .route(web::post().to(rollouts::start))
                .route(web::get().to(rollouts::list)),
        )
        .service(resource("/v1/rollouts/{task}").route(web::get().to(rollouts::get)))
        .service(resource("/v1/drift/{task}").route(web::get().to(drift::get)))
        .service(resource("/v1/rollouts/{task}/traffic").route(web::put().to(rollouts::traffic)))
        .service(resource("/v1/rollouts/{task}/promote").route(web::post().to(rollouts::promote)))
        .service(
            resource("/v1/rollouts/{task}/rollback").route(web::post().to(rollouts::rollback)),
        );
}

/// A resource that answers 405 (as JSON) to methods it has no route for.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

/// [`resource`] for OpenAI's routes, whose 405 comes in OpenAI's error shape.
fn openai_resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(openai_method_not_allowed))
}

/// 405 with the `Allow` header RFC 9110 asks for, listing the methods the OpenAPI document gives the path.
async fn method_not_allowed(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    use actix_web::ResponseError;
    with_allow(&req, not_allowed().error_response())
}

/// [`method_not_allowed`] in OpenAI's error shape, on its routes (`client.models.delete` meets it).
async fn openai_method_not_allowed(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    use actix_web::ResponseError;
    with_allow(
        &req,
        openai::OpenAiError::from(not_allowed()).error_response(),
    )
}

fn not_allowed() -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path",
    )
}

/// `response` with the `Allow` header naming the methods the OpenAPI document gives `req`'s path.
fn with_allow(
    req: &actix_web::HttpRequest,
    mut response: actix_web::HttpResponse,
) -> actix_web::HttpResponse {
    let allow = req
        .match_pattern()
        .and_then(|pattern| openapi::allowed_methods(&pattern));
    if let Some(allow) = allow.and_then(|a| HeaderValue::from_str(a).ok()) {
        response
            .headers_mut()
            .insert(actix_web::http::header::ALLOW, allow);
    }
    response
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::not_found("no such endpoint"))
}

/// Routes HEAD as GET: RFC 9110 asks for HEAD wherever GET is (load balancers probe `/health` with it),
/// and actix routes it nowhere. The connection still knows the request was HEAD and sends no body.
async fn head_as_get(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if req.method() == actix_web::http::Method::HEAD {
        req.head_mut().method = actix_web::http::Method::GET;
    }
    next.call(req).await
}

/// A request counted in flight until it is answered or dropped. One dropped unanswered (a reset
/// connection, a drain that ran out of time) is recorded too, as status 499: the slowest requests must not vanish from the latency
/// figures, nor stay counted in flight.
struct InFlight {
    metrics: Metrics,
    route: String,
    started: Instant,
    done: bool,
}

impl InFlight {
    fn begin(metrics: Metrics, route: String, started: Instant) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            route,
            started,
            done: false,
        }
    }

    fn finish(mut self, status: u16, task: &str, arm: &str) {
        self.done = true;
        self.record(status, task, arm);
    }

    fn record(&self, status: u16, task: &str, arm: &str) {
        let (m, route) = (&self.metrics, self.route.as_str());
        let seconds = self.started.elapsed().as_secs_f64();
        m.in_flight.dec();
        m.requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        m.request_duration
            .with_label_values(&[route, task, arm])
            .observe(seconds);
        m.latency_window.record(route, seconds);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.record(499, "", "");
        }
    }
}

/// Records duration and status of every request, labelled by the matched route pattern.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .filter(|s| s.config.server.request_metrics)
        .map(|s| s.metrics.clone());
    // The route label as the document names it (`/v1/models/{model}`, not its `{model:.+}` constraint).
    let route = match req.match_pattern() {
        Some(pattern) if pattern.contains(':') => openapi::plain_pattern(&pattern),
        Some(pattern) => pattern,
        None => "unmatched".to_owned(),
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let observed = metrics.map(|metrics| InFlight::begin(metrics, route, started));
    let result = next.call(req).await;
    if let Some(observed) = observed {
        let status = match &result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.as_response_error().status_code().as_u16(),
        };
        let labels = result
            .as_ref()
            .ok()
            .and_then(|r| r.response().extensions().get::<RouteLabels>().cloned());
        let (task, arm) = labels.map_or((String::new(), String::new()), |l| (l.task, l.arm));
        observed.finish(status, &task, &arm);
    }
    let mut response = result?;
    let header = HeaderName::from_static("x-request-id");
    if !response.headers().contains_key(&header) {
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(header, v);
        }
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

/// The application: shared state, body limits and error shapes, the request observer and the routes of
/// `role`.
pub fn app(
    state: web::Data<AppState>,
    role: Role,
) -> App<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let max_body = state.config.limits.max_body_bytes;
    App::new()
        .app_data(state)
        .app_data(
            web::JsonConfig::default()
                .limit(max_body)
                .error_handler(|e, _| json_error(e).into()),
        )
        .app_data(
            web::QueryConfig::default().error_handler(|e, _| {
                ApiError::invalid(format!("invalid query string: {e}")).into()
            }),
        )
        .wrap(middleware::from_fn(observe))
        .wrap(middleware::from_fn(deadline::body_deadline))
        .wrap(middleware::from_fn(head_as_get))
        .configure(|cfg| match role {
            Role::Api => routes(cfg, max_body),
            Role::Worker => ops_routes(cfg),
        })
        .default_service(web::to(not_found))
}

/// Binds the listener, loads the model in the background (`/ready` answers 503 until it is loaded), and
/// serves until SIGINT/SIGTERM, draining in-flight requests.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    serve_as(config, Role::Api).await
}

/// How long a second signal lets the trainer record its jobs before the process exits.
const FORCED_STOP_TRAINER_WAIT: Duration = Duration::from_secs(2);

/// Stops the server gracefully on the first SIGTERM or SIGINT (the listener closes, requests in flight are
/// answered within `server.shutdown_timeout_secs`), and exits on a second once the trainer has recorded
/// its jobs (at most [`FORCED_STOP_TRAINER_WAIT`]).
async fn stop_on_signals(handle: actix_web::dev::ServerHandle, services: Arc<OnceLock<Services>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the server with SIGKILL");
        return;
    };
    async fn next(
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> &'static str {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    let first = next(&mut term, &mut int).await;
    tracing::info!(signal = first, "stopping: answering the requests in flight");
    let graceful = actix_web::rt::spawn(handle.clone().stop(true));
    tokio::select! {
        _ = graceful => {}
        second = next(&mut term, &mut int) => {
            // The server handles one command at a time and is busy draining, so a forced stop sent to it
            // would wait for the drain: exit instead. Feedback is committed before its 202 and state files
            // are replaced whole; the trainer gets a moment to record its jobs as stopped by a shutdown
            // (re-run at the next start), not as crashed (a crashed re-run is not run again).
            tracing::warn!(signal = second, "stopping now, without waiting for the requests in flight");
            // The exit does not wait on the trainer's store beyond the wait and a second more (a database
            // that hangs must not keep the process alive).
            let (done, recorded) = std::sync::mpsc::channel();
            let _ = std::thread::Builder::new()
                .name("flywheel-exit".to_owned())
                .spawn(move || {
                    if let Some(services) = services.get() {
                        services.jobs.shutdown(FORCED_STOP_TRAINER_WAIT);
                    }
                    let _ = done.send(());
                });
            let _ = tokio::task::spawn_blocking(move || {
                let _ = recorded.recv_timeout(FORCED_STOP_TRAINER_WAIT + Duration::from_secs(1));
                std::process::exit(130);
            })
            .await;
        }
    }
}

/// [`serve`] answering the routes of `role`.
pub async fn serve_as(config: Config, role: Role) -> Result<(), ServeError> {
    let auto_job = crate::app::preflight(&config)?;
    // Held until the server has stopped. Replicas on PostgreSQL keep no state files in their data
    // directory, so only a single process takes it.
    let _data_dir = match config.store.backend {
        crate::config::StoreBackend::Sqlite => Some(crate::dirlock::DataDirLock::acquire(
            &config.data.dir,
            "serve",
        )?),
        crate::config::StoreBackend::Postgres => None,
    };
    let metrics = Metrics::new();
    let services = Arc::new(OnceLock::new());
    let state = web::Data::new(AppState {
        config: config.clone(),
        metrics: metrics.clone(),
        services: services.clone(),
    });
    let stopping = services.clone();
    let shutdown_deadline = Duration::from_secs(config.server.shutdown_timeout_secs);
    // PostgreSQL connections and the object store's runtime block when dropped, which panics on an async
    // thread.
    let blocking_drop = config.store.backend == crate::config::StoreBackend::Postgres
        || !config.store.objects_url.trim().is_empty();
    // Signals are ours: actix stops at once on SIGINT, dropping requests in flight.
    let server = HttpServer::new(move || app(state.clone(), role))
        .workers(config.server.workers)
        .shutdown_timeout(config.server.shutdown_timeout_secs)
        .disable_signals()
        .bind((config.server.host.as_str(), config.server.port))?;
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
    }
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(stop_on_signals(handle.clone(), services.clone()));
    let load_error = Arc::new(std::sync::Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let stop_autopilot = stop.clone();
    let loader_error = load_error.clone();
    std::thread::Builder::new()
        .name("flywheel-load".to_owned())
        .spawn(move || {
            match crate::app::load(&config, metrics.clone()) {
                Ok(loaded) => {
                    if let Err(e) = crate::app::start_autopilot(
                        &config,
                        &loaded,
                        auto_job,
                        &metrics,
                        stop_autopilot,
                    ) {
                        tracing::error!(error = %e, "cannot start the autopilot thread");
                    }
                    let _ = services.set(loaded);
                    metrics.model_ready.set(1);
                    tracing::info!(model = %config.model.dir.display(), "model ready");
                }
                Err(e) => {
                    tracing::error!(error = %e, "the model or a store failed to open; stopping");
                    *loader_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    // Sends the stop command now; nothing needs to wait for it here.
                    drop(handle.stop(false));
                }
            }
        })?;
    let served = server.await;
    stop.store(true, Ordering::Relaxed);
    // HTTP has drained; the trainer stops at its next micro-batch and records the job as interrupted. On a
    // thread of its own: with PostgreSQL that record is written by a blocking client, which must not run on
    // this async thread.
    let jobs = stopping.clone();
    let stopped = std::thread::Builder::new()
        .name("flywheel-shutdown".to_owned())
        .spawn(move || jobs.get().map(|s| s.jobs.shutdown(shutdown_deadline)))
        .map(|thread| thread.join().unwrap_or(None));
    match stopped {
        Ok(Some(true)) => tracing::info!("trainer stopped"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot start the thread that stops the trainer"),
    }
    if blocking_drop {
        // Not dropped here: the services hold PostgreSQL connections or the object store's runtime, whose
        // drop blocks, which panics on this async thread. The process is ending; they end with it.
        std::mem::forget(stopping);
    }
    served?;
    // Set before the loader asked the server to stop, so present whenever that is why it stopped (the
    // loader thread may still hold its handle on it).
    let failed = load_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
