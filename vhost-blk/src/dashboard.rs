//! The health dashboard's page: HTML, a script and a style sheet compiled into the binary
//! (the daemon's hosts may have no internet, so nothing is loaded from elsewhere). The page
//! holds no data; its script reads `/v1/health`, `/v1/disks` and `/v1/history` with the
//! viewer's own credentials, so it is served to anyone who reaches the API, as a login page
//! is, and shows nothing to a caller without a role.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Where the page is.
pub const PATH: &str = "/dashboard";

/// Its files under [`PATH`]: the page itself at "".
pub const ASSETS_PATH: &str = "/dashboard/{file}";

const FILES: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/style.css"),
    ),
];

/// Only this origin's script, style and API; no frames, forms or other origins.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      connect-src 'self'; img-src 'self'; base-uri 'none'; \
                      form-action 'none'; frame-ancestors 'none'";

fn serve(name: &str) -> Response {
    let Some((_, kind, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return daemon_support::http::json_error(
            StatusCode::NOT_FOUND,
            &format!("no such resource: {PATH}/{name}"),
        );
    };
    let mut r = (*body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /dashboard`.
pub async fn page() -> Response {
    serve("")
}

/// `GET /dashboard/{file}`.
pub async fn asset(Path(file): Path<String>) -> Response {
    serve(&file)
}
