//! Mutual TLS for an agent: towards the cluster's gRPC port (the control session) and
//! between agents (block sync). Every certificate is issued by the cluster CA; each side
//! verifies the other's.

use std::fmt;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// An agent's certificate and key (PEM, issued by the cluster CA) and the CA (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct AgentTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("AgentTls")
            .field("ca_bytes", &self.ca_pem.len())
            .field("cert_bytes", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

impl AgentTls {
    /// The caller has checked the files (the node's `TlsMaterial::load` does).
    pub fn from_pem(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        AgentTls {
            ca_pem,
            cert_pem,
            key_pem,
        }
    }

    /// The CA, this agent's certificate and its key (PEM), for the block-sync client's
    /// own HTTP/2 connection (blocksync/wire.rs).
    pub(crate) fn pems(&self) -> (&[u8], &[u8], &[u8]) {
        (&self.ca_pem, &self.cert_pem, &self.key_pem)
    }

    /// Client side: trust only the cluster CA, present this agent's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// Server side (the block-sync service): this agent's certificate; a client must
    /// present one issued by the cluster CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }
}
