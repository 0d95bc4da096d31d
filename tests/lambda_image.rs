//! The agent started exactly as the Lambda image starts it: through
//! lambda-image/bootstrap, as an unprivileged user, with a read-only task
//! root and HOME, where only the environment's /tmp (TMPDIR) is writable.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use mvm_shard::dispatch::ShardStatus;
use mvm_shard::emulator::FunctionConfig;
use mvm_shard::protocol::SourceSpec;

/// Lambda runs functions as an unprivileged user; nobody (65534) stands in.
const UNPRIVILEGED: &str = "65534";

fn image_function(home: &Path) -> FunctionConfig {
    let bootstrap = Path::new(env!("CARGO_MANIFEST_DIR")).join("lambda-image/bootstrap");
    let mut f = FunctionConfig::new(
        "image",
        vec![
            "setpriv".into(),
            format!("--reuid={UNPRIVILEGED}"),
            format!("--regid={UNPRIVILEGED}"),
            "--clear-groups".into(),
            "--".into(),
            bootstrap.display().to_string(),
        ],
    );
    f.tenant_isolation = true;
    f.env = vec![
        ("MVM_SHARD_BIN".into(), binary().into()),
        // The Dockerfile's ENV HOME=/tmp points at a folder the function cannot
        // write here, so that a write outside TMPDIR would fail the shard.
        ("HOME".into(), home.display().to_string()),
    ];
    f
}

#[tokio::test]
async fn the_agent_runs_from_the_image_bootstrap_as_an_unprivileged_user_writing_only_tmp() {
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let emu = emulator(vec![image_function(home.path())]).await;
    let backend = backend(&emu.endpoint, "image", true).await;

    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("input.txt"), "from the source\n").unwrap();
    let archive = mvm_shard::source::pack(src.path()).unwrap();
    let mut req = request(
        "id -u; cat input.txt; echo built > out.txt; mkdir -p $HOME/.cache && touch $TMPDIR/t $HOME/.cache/c; \
         touch \"$LAMBDA_TASK_ROOT/x\" 2>/dev/null && echo task-root-writable; cat out.txt",
        1,
        1,
        Duration::from_secs(60),
    );
    req.source = SourceSpec::Inline {
        archive: base64::engine::general_purpose::STANDARD
            .encode(archive.packed.as_ref().unwrap().read().unwrap()),
    };
    let done = run(backend, vec![req], 1).await;
    let rec = &done.summary.records[0];
    assert_eq!(
        rec.status,
        ShardStatus::Passed,
        "{rec:?}\n{}",
        String::from_utf8_lossy(done.stderr.get(&1).map(|v| &v[..]).unwrap_or(b""))
    );
    assert_eq!(
        done.stdout_of(1),
        format!("{UNPRIVILEGED}\nfrom the source\nbuilt\n")
    );
    assert!(rec.result.as_ref().unwrap().fresh_environment);
    assert_eq!(
        std::fs::read_dir(home.path()).unwrap().count(),
        0,
        "something wrote to HOME"
    );
    emu.shutdown().await.unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}
