//! A Lambda function built on the official Rust runtime client
//! (`lambda_runtime`), not on our agent: the emulator must run it as Lambda
//! would. `tests/foreign_clients.rs` hosts it; it is also a template for a
//! plain function under `mvm-shard emulate --function`.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    if event.payload.get("fail").is_some() {
        return Err("failing on request".into());
    }
    Ok(json!({
        "echo": event.payload,
        "request_id": event.context.request_id,
        "function_arn": event.context.invoked_function_arn,
    }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
