//! The status page: a read-only web view of the farm for people.
//!
//! Queue depth by model and state, workers with their devices and current
//! jobs, recent batches with live progress, and per batch a contact sheet of
//! its finished images (thumbnails made here from the results store, prompt
//! and seed on hover, a click opens the full PNG). The page is static HTML,
//! CSS and script compiled into the binary; the script polls the JSON routes
//! of [`api`] every two seconds.
//!
//! Invariants:
//! - The page only reads: no route changes anything but the sign-in cookie.
//! - A token sees here what the gRPC API shows it: an admin token everything,
//!   a submit token its own batches (another's answers 404, as a missing one
//!   does) and the fleet only in aggregate (no hostnames, no job ids of others).
//! - Served over the gRPC server's TLS (same files, same SIGHUP reload) when
//!   `[server.tls]` is set; then the cookie is `Secure` too.
//!
//! Signing in: `Authorization: Bearer <token>` on any route, or the cookie
//! that `POST /login` sets (HttpOnly, SameSite=Strict). `/login#token=…`
//! signs in from a link: the fragment never leaves the browser, the page's
//! script posts it.

mod api;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use flowfarm_core::Role;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::auth::Caller;
use crate::tls::ServerTls;
use crate::Coordinator;

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");
const PAGE_CSS: &str = include_str!("page.css");
const LOGIN_HTML: &str = include_str!("login.html");
/// Over HTTPS the cookie is `__Host-` prefixed: the browser then keeps it
/// for this host and port only, sent over TLS only.
const COOKIE: &str = "flowfarm_token";
const SECURE_COOKIE: &str = "__Host-flowfarm_token";
/// How long a sign-in lasts in the browser; the token's own expiry and
/// revocation still apply on every request.
const COOKIE_MAX_AGE_SECONDS: u32 = 12 * 3600;
/// Who may look: everyone but workers.
const VIEWERS: &[Role] = &[Role::Admin, Role::Submit];

#[derive(Clone)]
struct Page {
    coordinator: Coordinator,
    /// Served over TLS: the cookie is marked Secure.
    secure: bool,
}

/// Why a request gets no page, as the HTTP status and a sentence.
#[derive(Debug)]
enum Refusal {
    NotSignedIn(String),
    Forbidden(String),
    BadRequest(String),
    NotFound(String),
    Unavailable(String),
}

impl From<tonic::Status> for Refusal {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::Unauthenticated => Refusal::NotSignedIn(message),
            Code::PermissionDenied => Refusal::Forbidden(message),
            Code::InvalidArgument => Refusal::BadRequest(message),
            Code::NotFound => Refusal::NotFound(message),
            _ => Refusal::Unavailable(message),
        }
    }
}

impl From<flowfarm_store::StoreError> for Refusal {
    fn from(e: flowfarm_store::StoreError) -> Self {
        crate::convert::store_status(e).into()
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Refusal::NotSignedIn(m) => (StatusCode::UNAUTHORIZED, format!("{m}: sign in at /login with an admin or submit token")),
            Refusal::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Refusal::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Refusal::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Refusal::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{message}\n")).into_response()
    }
}

impl Page {
    /// The caller behind the request's bearer header or sign-in cookie.
    async fn viewer(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let secret =
            bearer(headers).or_else(|| cookie(headers, self.cookie_name())).ok_or_else(|| Refusal::NotSignedIn("not signed in".into()))?;
        Ok(self.coordinator.shared.auth.authorize_secret(&secret, VIEWERS).await?)
    }

    fn cookie_name(&self) -> &'static str {
        if self.secure {
            SECURE_COOKIE
        } else {
            COOKIE
        }
    }

    fn cookie(&self, value: &str, max_age: u32) -> HeaderValue {
        let (name, secure) = (self.cookie_name(), if self.secure { "; Secure" } else { "" });
        // A token is `fft_` and hex: nothing in it needs quoting in a cookie.
        HeaderValue::from_str(&format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"))
            .unwrap_or_else(|_| HeaderValue::from_static("flowfarm_token=; Path=/; Max-Age=0"))
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    crate::auth::bearer_credentials(value).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, value)| *key == name && !value.is_empty())
        .map(|(_, value)| value.to_owned())
}

/// `/` and `/batches/{id}`: the page (its script reads the path); the
/// sign-in form for a browser that is not signed in.
async fn index(State(page): State<Page>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    match page.viewer(&headers).await {
        Ok(_) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE_HTML).into_response(),
        // The page asked for comes back after sign-in.
        Err(Refusal::NotSignedIn(_)) => match local_path(uri.path()) {
            "/" => Redirect::to("/login").into_response(),
            next => Redirect::to(&format!("/login#next={next}")).into_response(),
        },
        Err(other) => other.into_response(),
    }
}

/// `next` if it is one of the page's own paths (`/` or `/batches/{uuid}`),
/// else `/`: a sign-in never sends a browser anywhere else.
fn local_path(next: &str) -> &str {
    match next.strip_prefix("/batches/") {
        Some(id) if uuid::Uuid::parse_str(id).is_ok() && id.len() == 36 => next,
        _ => "/",
    }
}

fn login_page(status: StatusCode, message: &str, next: &str) -> Response {
    let html = LOGIN_HTML.replace("{{message}}", &escape_html(message)).replace("{{next}}", &escape_html(local_path(next)));
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn login_form() -> Response {
    login_page(StatusCode::OK, "", "/")
}

/// Whether a browser's POST comes from one of this server's pages: the
/// `Origin` it sends names this host (clients that send none, like curl,
/// are not browsers another site can drive). The host is the `Host` header
/// over HTTP/1.1, and the request's authority over HTTP/2 (over TLS), which
/// has no `Host` header.
fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| uri.authority().map(|a| a.as_str())).unwrap_or_default();
    origin.split_once("://").is_some_and(|(_, authority)| !host.is_empty() && authority.eq_ignore_ascii_case(host))
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
    /// Where to go once signed in: a path on this server.
    #[serde(default)]
    next: String,
}

/// Checks the token, then keeps it in an HttpOnly cookie.
async fn login(State(page): State<Page>, headers: HeaderMap, uri: axum::http::Uri, Form(form): Form<Login>) -> Response {
    let next = local_path(&form.next);
    if !same_origin(&headers, &uri) {
        // Another site signing a browser in with a token of its choosing.
        return login_page(StatusCode::FORBIDDEN, "sign in from this server's own page", next);
    }
    let token = form.token.trim();
    if token.is_empty() {
        return login_page(StatusCode::BAD_REQUEST, "token: paste an admin or submit token (farmctl tokens create)", next);
    }
    match page.coordinator.shared.auth.authorize_secret(token, VIEWERS).await {
        Ok(_) => {
            let mut response = Redirect::to(next).into_response();
            response.headers_mut().insert(header::SET_COOKIE, page.cookie(token, COOKIE_MAX_AGE_SECONDS));
            response
        }
        Err(status) if status.code() == Code::Unauthenticated => {
            login_page(StatusCode::UNAUTHORIZED, "token: unknown, revoked or expired; ask an admin for a new one", next)
        }
        Err(status) if status.code() == Code::PermissionDenied => {
            login_page(StatusCode::FORBIDDEN, "token: a worker token cannot open the status page; use an admin or submit token", next)
        }
        Err(status) => login_page(StatusCode::SERVICE_UNAVAILABLE, status.message(), next),
    }
}

async fn logout(State(page): State<Page>) -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(header::SET_COOKIE, page.cookie("", 0));
    response
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], PAGE_JS)
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], PAGE_CSS)
}

/// What every answer carries: no framing, no sniffing, no referrer to other sites, and
/// scripts and styles from this server only (images keep their stricter,
/// sandboxing policy).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // same-origin, not no-referrer: with no-referrer a browser sends `Origin: null`
    // on its own form posts, and the sign-in could not tell them from another site's.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'self'"),
        );
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn router(page: Page) -> axum::Router {
    axum::Router::new()
        .route("/", get(index))
        .route("/batches/{id}", get(index))
        .route("/page.js", get(script))
        .route("/page.css", get(style))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/api/status", get(api::status))
        .route("/api/batches/{id}", get(api::batch))
        .route("/api/jobs/{id}/image", get(api::image))
        .route("/api/jobs/{id}/thumbnail", get(api::thumbnail))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(page)
}

/// The TLS connections of a listener, as axum takes connections.
struct TlsListener {
    incoming: ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (stream, peer);
                }
                // Handshakes that fail are dropped before they get here.
                Some(Err(_)) => continue,
                // The acceptor ends only with the listener: accept nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves the status page on `listener` (over the server's TLS when it has
/// one) until `shutdown` is cancelled.
///
/// # Errors
/// The listener's I/O error.
pub async fn serve_status_page(coordinator: Coordinator, listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let tls: Option<Arc<ServerTls>> = coordinator.shared.tls.clone();
    let tasks = coordinator.shared.tasks.clone();
    let app = router(Page { coordinator, secure: tls.is_some() });
    let stopped = shutdown.cancelled_owned();
    match tls {
        Some(tls) => {
            let local = listener.local_addr()?;
            let listener = TlsListener { incoming: tls.incoming(listener, &tasks), local };
            axum::serve(listener, app).with_graceful_shutdown(stopped).await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(stopped).await,
    }
}

/// Binds `addr` for [`serve_status_page`], saying which key to change when it fails.
///
/// # Errors
/// The bind error, with context.
pub async fn bind_status_page(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot serve the status page on {addr} (status.listen / FLOWFARM_STATUS__LISTEN): {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_in_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; flowfarm_token=fft_ab12; b=2"));
        assert_eq!(cookie(&headers, COOKIE).as_deref(), Some("fft_ab12"));
        headers.insert(header::COOKIE, HeaderValue::from_static("flowfarm_token="));
        assert_eq!(cookie(&headers, COOKIE), None, "an emptied cookie is no sign-in");
    }

    #[test]
    fn a_sign_in_only_leads_to_the_pages_own_paths() {
        let batch = "/batches/01a22d2f-a0e0-71ce-8f54-9e7bed30155d";
        assert_eq!(local_path(batch), batch);
        for elsewhere in
            ["//evil.example/", "/\t/evil.example", "/%09/evil.example", "https://evil.example/", "/batches/x", "/api/status", ""]
        {
            assert_eq!(local_path(elsewhere), "/", "{elsewhere:?}");
        }
    }

    #[test]
    fn a_post_from_another_site_is_told_apart() {
        let path: axum::http::Uri = "/login".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&headers, &path), "no Origin: not a browser driven by another site");
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(same_origin(&headers, &path));
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(!same_origin(&headers, &path));
    }

    #[test]
    fn over_http2_the_host_is_the_requests_authority() {
        // HTTP/2 (what browsers speak over TLS here) sends :authority, no Host.
        let absolute: axum::http::Uri = "https://Farm.example:8080/login".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://farm.example:8080"));
        assert!(same_origin(&headers, &absolute), "hosts compare in any case");
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(!same_origin(&headers, &absolute));
        let path: axum::http::Uri = "/login".parse().unwrap();
        assert!(!same_origin(&headers, &path), "no host known: a browser's POST is refused");
    }

    #[test]
    fn messages_are_escaped_into_the_page() {
        assert_eq!(escape_html(r#"<b a="x">&'"#), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }
}
