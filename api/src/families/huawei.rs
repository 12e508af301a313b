//! Huawei Cloud SDRS (`/v1/{project_id}/…`) and ECS (`/v1/{project_id}/cloudservers/…`, `/v1/{project_id}/jobs/…`): endpoints SDRS-*, ECS-* of ../shared/spec.
//! Translates the wire format into operations on the shared model and back; holds no
//! state of its own.

use axum::Router;

use crate::routes::AppState;

/// This family's routes (merged into the node's router; authentication already ran).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
}
