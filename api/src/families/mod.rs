//! The five vendor API families, one module each (SDRS and ECS share `huawei`).

pub(crate) mod danube;
pub(crate) mod huawei;
pub(crate) mod manila;
pub(crate) mod trove;
