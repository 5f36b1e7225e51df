//! Talking to the controller cluster: one endpoint per `--controller` address (TLS from the
//! shared [`victor_proto::tls`] helper), the bearer token added to every call, and fail-over:
//! a call goes to the controller that answered last and moves on to the next address when a
//! connection fails or the controller answers UNAVAILABLE (by the contract, nothing was written).

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use victor_proto::tls::{ClientTlsFiles, endpoint};
use victor_proto::v1::binding_service_client::BindingServiceClient;

use crate::cli::Global;
use crate::error::{CtlError, chain};

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A BindingService client with the token.
pub type Client = BindingServiceClient<InterceptedService<Channel, Token>>;

/// The controllers and how to reach them.
pub struct Controllers {
    endpoints: Vec<(String, Endpoint)>,
    token: Token,
    timeout: Duration,
    /// Index of the controller to try first.
    current: usize,
}

impl Controllers {
    /// Checks the options and TLS files; connects lazily.
    pub fn new(global: &Global) -> Result<Controllers, CtlError> {
        let tls = ClientTlsFiles {
            ca_file: global.ca_file.clone(),
            cert_file: global.cert_file.clone(),
            key_file: global.key_file.clone(),
            server_name: global.tls_server_name.clone(),
        }
        .load()?;
        let endpoints = global
            .controller
            .iter()
            .filter(|a| !a.trim().is_empty())
            .map(|a| Ok((a.trim().to_owned(), endpoint(a, tls.as_ref(), global.connect_timeout)?)))
            .collect::<Result<Vec<_>, CtlError>>()?;
        if endpoints.is_empty() {
            return Err(CtlError::Usage("--controller is empty; give at least one host:port".into()));
        }
        let token = match (&global.token, &global.token_file) {
            (_, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| CtlError::Usage(format!("cannot read --token-file {}: {e}", path.display())))?;
                let line = text.lines().next().unwrap_or("").trim().to_owned();
                if line.is_empty() {
                    return Err(CtlError::Usage(format!("--token-file {} is empty", path.display())));
                }
                Some(line)
            }
            (Some(t), None) => Some(t.trim().to_owned()),
            (None, None) => None,
        };
        let token = token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| CtlError::Usage("the token contains characters not allowed in gRPC metadata".into()))
            })
            .transpose()?;
        Ok(Controllers { endpoints, token: Token(token), timeout: global.timeout, current: 0 })
    }

    /// The address of the controller that answered last.
    pub fn current_address(&self) -> &str {
        &self.endpoints[self.current].0
    }

    /// Makes the next call start with the controller after the current one (after a stream broke).
    pub fn skip_current(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len();
    }

    /// Runs `call` against the controllers in turn until one answers with something other than
    /// UNAVAILABLE. Each attempt is bounded by `--timeout`.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, CtlError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut failures = Vec::new();
        let n = self.endpoints.len();
        for i in 0..n {
            let index = (self.current + i) % n;
            let (address, endpoint) = &self.endpoints[index];
            let channel = match endpoint.connect().await {
                Ok(channel) => channel,
                Err(err) => {
                    failures.push(format!("{address}: {}", chain(&err)));
                    continue;
                }
            };
            let client = BindingServiceClient::with_interceptor(channel, self.token.clone())
                .max_decoding_message_size(256 << 20);
            match tokio::time::timeout(self.timeout, call(client)).await {
                Ok(Ok(response)) => {
                    self.current = index;
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) if status.code() == Code::Unavailable => {
                    failures.push(format!("{address}: UNAVAILABLE: {}", status.message()));
                }
                Ok(Err(status)) => return Err(classify(address, endpoint, status).await),
                Err(_) => {
                    return Err(CtlError::Rpc(Status::deadline_exceeded(format!(
                        "{address} did not answer within {} (--timeout); the call may or may not have been applied",
                        humantime::format_duration(self.timeout)
                    ))));
                }
            }
        }
        Err(CtlError::Unreachable(failures.join("; ")))
    }
}

/// Classifies a call's error status ([`CtlError::from_status`]); in addition, a call that failed
/// at the transport against an address answering plain HTTP/1.1 reached an HTTP/1-only server
/// (the controller's admin port serves HTTP/1.1 only, so a gRPC call there ends in a transport
/// error rather than an HTTP status): [`CtlError::NotGrpc`].
async fn classify(address: &str, endpoint: &Endpoint, status: Status) -> CtlError {
    let transport_failure = status.code() == Code::Unknown && status.message().contains("transport error");
    match endpoint.uri().authority() {
        Some(authority) if transport_failure && answers_http1(authority.as_str()).await => {
            CtlError::NotGrpc { address: address.to_owned(), status }
        }
        _ => CtlError::from_status(address, status),
    }
}

/// Whether `authority` (host:port) answers an HTTP/1.1 request within a second.
async fn answers_http1(authority: &str) -> bool {
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect(authority).await.ok()?;
        let request = format!("HEAD /healthz HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 7];
        tcp.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/1.")
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}
