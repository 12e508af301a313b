//! OpenStack Trove (`/v1.0/{project_id}/…`): endpoints TROVE-* of ../shared/spec.
//! Translates the wire format into operations on the shared model and back; holds no
//! state of its own.

use axum::Router;

use crate::routes::AppState;

/// This family's routes (merged into the node's router; authentication already ran).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
}
