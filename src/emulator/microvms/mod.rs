//! Lambda MicroVMs in the emulator: [`MicrovmImageConfig`] images are
//! commands, and [`Microvms`] keeps every microVM started from them, with
//! `RunMicrovm`'s idempotency, for the control plane in `routes`.
//!
//! See "The emulator's MicroVMs" in `docs/microvm-protocol.md`.

mod errors;
mod proxy;
mod routes;
mod tokens;
mod vm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use errors::MicrovmApiError;
pub use routes::router;
use routes::{epoch_seconds, RunMicrovmRequest};
use vm::{Hooks, Microvm, Spec};

/// Name of the image `emulate` hosts when none is given.
pub const DEFAULT_MICROVM_IMAGE: &str = "mvm-shard";
/// The only version an emulated image has.
const IMAGE_VERSION: &str = "1";
/// How long `TerminateMicrovm` and shutdown wait for a microVM to be gone.
const TERMINATE_WAIT: Duration = Duration::from_secs(15);

/// One emulated MicroVM image: the command that plays the microVM's
/// application, started in a fresh folder per microVM.
#[derive(Debug, Clone)]
pub struct MicrovmImageConfig {
    /// The image name; its ARN is built from it.
    pub name: String,
    /// argv of the application.
    pub command: Vec<String>,
}

impl MicrovmImageConfig {
    /// An image named `name` whose microVMs run `command`.
    pub fn new(name: impl Into<String>, command: Vec<String>) -> Self {
        MicrovmImageConfig {
            name: name.into(),
            command,
        }
    }

    /// The image `mvm-shard emulate` hosts by default: this binary's agent in
    /// MicroVM mode.
    pub fn default_agent() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        Ok(MicrovmImageConfig::new(
            DEFAULT_MICROVM_IMAGE,
            vec![
                exe.display().to_string(),
                "agent".into(),
                "--microvm".into(),
            ],
        ))
    }
}

/// An image as the control plane shows it.
pub struct Image {
    /// What it runs.
    pub config: MicrovmImageConfig,
    /// `arn:aws:lambda:REGION:000000000000:microvm-image:NAME`.
    pub arn: String,
}

/// How one `RunMicrovm` ended: the microVM, or the error every retry with
/// the same client token gets.
type Outcome = Result<Arc<Microvm>, MicrovmApiError>;

/// A `RunMicrovm` seen with a client token: the request (less the token), to
/// tell a retry from a reuse, and its outcome once known.
struct Started {
    request: RunMicrovmRequest,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// Faults the emulator injects on purpose, so that clients can be tested
/// against what the real service does rarely: connections that break, tokens
/// that expire.
#[derive(Debug, Clone, Copy, Default)]
pub struct MicrovmFaults {
    /// Tokens live this long instead of the minutes asked for.
    pub token_lifetime: Option<std::time::Duration>,
    /// Every proxied response is broken off after this many body bytes.
    pub cut_responses_after: Option<u64>,
    /// The first answer to each client token of `RunMicrovm` is held back
    /// this long while the microVM starts anyway, as a slow or lost response
    /// would: the window in which an interrupted client must still find it.
    pub hold_run_answers: Option<std::time::Duration>,
}

/// Every microVM of an emulator, running or terminated.
pub struct Microvms {
    /// Faults injected on purpose.
    pub faults: MicrovmFaults,
    images: Vec<Arc<Image>>,
    region: String,
    base: PathBuf,
    created_at: SystemTime,
    vms: Mutex<HashMap<String, Arc<Microvm>>>,
    seq: AtomicU64,
    client_tokens: Mutex<HashMap<String, Started>>,
    hooks: Hooks,
    forwarder: proxy::Forwarder,
    closing: CancellationToken,
}

impl Microvms {
    /// Hosts `images`; each microVM gets a folder under `base`.
    pub fn new(
        images: Vec<MicrovmImageConfig>,
        region: &str,
        base: PathBuf,
        faults: MicrovmFaults,
    ) -> std::io::Result<Self> {
        let images = images
            .into_iter()
            .map(|config| {
                Arc::new(Image {
                    arn: format!(
                        "arn:aws:lambda:{region}:000000000000:microvm-image:{}",
                        config.name
                    ),
                    config,
                })
            })
            .collect();
        Ok(Microvms {
            faults,
            images,
            region: region.to_string(),
            base,
            created_at: SystemTime::now(),
            vms: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            client_tokens: Mutex::new(HashMap::new()),
            hooks: Hooks::new()?,
            forwarder: proxy::forwarder(),
            closing: CancellationToken::new(),
        })
    }

    /// `RunMicrovm`: checks the request, then starts a microVM and answers at
    /// once with it `PENDING`, as the service does (provisioning goes on in
    /// the background), or answers as the first call with the same client
    /// token did.
    pub async fn run(self: &Arc<Self>, request: RunMicrovmRequest) -> Outcome {
        let maximum_duration = request.validate()?;
        let image = self.image(request.image_identifier.as_deref().unwrap_or_default())?;
        if self.closing.is_cancelled() {
            return Err(MicrovmApiError::internal("the emulator is stopping"));
        }
        let mut first_answer = true;
        let mut outcome = match request.client_token.clone() {
            None => self.launch(image, request, maximum_duration),
            Some(token) => {
                let fingerprint = RunMicrovmRequest {
                    client_token: None,
                    ..request.clone()
                };
                let mut tokens = self.client_tokens.lock().expect("lock poisoned");
                match tokens.get(&token) {
                    Some(started) if started.request == fingerprint => {
                        first_answer = false;
                        started.outcome.clone()
                    }
                    Some(_) => {
                        return Err(MicrovmApiError::conflict(
                            "ClientToken",
                            &token,
                            format!("clientToken {token} was already used with other parameters"),
                        ))
                    }
                    None => {
                        let outcome = self.launch(image, request, maximum_duration);
                        tokens.insert(
                            token,
                            Started {
                                request: fingerprint,
                                outcome: outcome.clone(),
                            },
                        );
                        outcome
                    }
                }
            }
        };
        if let (true, Some(hold)) = (first_answer, self.faults.hold_run_answers) {
            tokio::time::sleep(hold).await;
        }
        let known = outcome.wait_for(Option::is_some).await;
        match known.as_deref() {
            Ok(Some(outcome)) => outcome.clone(),
            _ => Err(MicrovmApiError::internal(
                "the microVM's start was abandoned",
            )),
        }
    }

    /// Starts the microVM in a task of its own, which goes on even if the
    /// caller goes away; its outcome is published on the returned channel.
    fn launch(
        self: &Arc<Self>,
        image: Arc<Image>,
        request: RunMicrovmRequest,
        maximum_duration: u32,
    ) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.start(image, request, maximum_duration).await;
            tx.send_replace(Some(outcome));
        });
        rx
    }

    async fn start(
        self: &Arc<Self>,
        image: Arc<Image>,
        request: RunMicrovmRequest,
        maximum_duration: u32,
    ) -> Outcome {
        let id = format!("mvm-{}", &uuid::Uuid::new_v4().simple().to_string()[..20]);
        let payload = Bytes::from(request.run_hook_payload.clone().unwrap_or_default());
        let name = image.config.name.clone();
        let vm = Microvm::spawn(Spec {
            id,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            image,
            image_version: request
                .image_version
                .clone()
                .unwrap_or_else(|| IMAGE_VERSION.into()),
            request,
            maximum_duration,
            base: self.base.clone(),
            region: self.region.clone(),
            hooks: self.hooks.clone(),
            forwarder: self.forwarder.clone(),
            cut_responses_after: self.faults.cut_responses_after,
        })
        .await
        .map_err(|e| MicrovmApiError::internal(format!("cannot start a microVM of {name}: {e}")))?;
        self.vms
            .lock()
            .expect("lock poisoned")
            .insert(vm.id.clone(), vm.clone());
        if self.closing.is_cancelled() {
            vm.terminate("the emulator stopped");
        }
        // PENDING until `ready` and `run` went through, then RUNNING; a start
        // that fails (the image exits, a hook refuses) does not fail the call
        // but ends the microVM TERMINATED, with the reason in `stateReason`.
        let booting = vm.clone();
        let hooks = self.hooks.clone();
        tokio::spawn(async move {
            if let Err(reason) = booting.boot(&hooks, payload).await {
                tracing::debug!(microvm = %booting.id, %reason, "microVM did not start");
            }
        });
        Ok(vm)
    }

    /// The microVM `identifier` (its id, or anything ending in `/ID` or `:ID`).
    pub fn get(&self, identifier: &str) -> Result<Arc<Microvm>, MicrovmApiError> {
        let id = identifier.rsplit(['/', ':']).next().unwrap_or(identifier);
        self.vms
            .lock()
            .expect("lock poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| MicrovmApiError::not_found("Microvm", identifier))
    }

    /// Every microVM, oldest first.
    pub fn all(&self) -> Vec<Arc<Microvm>> {
        let mut all: Vec<Arc<Microvm>> = self
            .vms
            .lock()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|vm| vm.seq);
        all
    }

    /// `TerminateMicrovm`: ends the microVM and waits (boundedly) until its
    /// process tree is gone, so that a caller sees `TERMINATED` next. A
    /// terminated microVM terminates again without error, as on AWS.
    pub async fn terminate(&self, identifier: &str) -> Result<(), MicrovmApiError> {
        let vm = self.get(identifier)?;
        vm.terminate("terminated by TerminateMicrovm");
        let _ = tokio::time::timeout(TERMINATE_WAIT, vm.exited.cancelled()).await;
        Ok(())
    }

    /// Ends every microVM and refuses new ones, for the emulator's shutdown.
    pub async fn terminate_all(&self) {
        self.closing.cancel();
        let vms = self.all();
        for vm in &vms {
            vm.terminate("the emulator stopped");
        }
        for vm in &vms {
            let _ = tokio::time::timeout(TERMINATE_WAIT, vm.exited.cancelled()).await;
        }
    }

    /// The image an identifier names: its name or ARN, with or without a
    /// `:VERSION` suffix.
    pub fn image(&self, identifier: &str) -> Result<Arc<Image>, MicrovmApiError> {
        let name = identifier
            .rsplit_once("microvm-image:")
            .map_or(identifier, |(_, rest)| rest);
        let name = name.split(':').next().unwrap_or(name);
        self.images
            .iter()
            .find(|i| i.config.name == name)
            .cloned()
            .ok_or_else(|| MicrovmApiError::not_found("MicrovmImage", identifier))
    }

    /// Every image, as configured.
    pub fn images(&self) -> &[Arc<Image>] {
        &self.images
    }

    /// The `GetMicrovmImage` document (also a `ListMicrovmImages` item).
    pub fn describe_image(&self, image: &Image) -> Value {
        json!({
            "imageArn": image.arn,
            "name": image.config.name,
            "state": "CREATED",
            "latestActiveImageVersion": IMAGE_VERSION,
            "createdAt": epoch_seconds(self.created_at),
        })
    }
}
