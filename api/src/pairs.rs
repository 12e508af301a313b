//! Native replication-pair endpoints under `/drplane/v1/pairs`.

use axum::Router;

use crate::routes::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
}
