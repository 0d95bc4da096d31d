"""Calls InvokeWithResponseStream with boto3 (a client that is not ours) and
writes the concatenated PayloadChunk bytes to stdout, then one JSON line with
the InvokeComplete event to stderr."""
import json
import sys

import boto3

endpoint, function, payload_file = sys.argv[1], sys.argv[2], sys.argv[3]
tenant = sys.argv[4] if len(sys.argv) > 4 else None
client = boto3.client(
    "lambda",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
with open(payload_file, "rb") as f:
    payload = f.read()
kwargs = {"FunctionName": function, "Payload": payload}
if tenant:
    kwargs["TenantId"] = tenant
response = client.invoke_with_response_stream(**kwargs)
complete = None
for event in response["EventStream"]:
    if "PayloadChunk" in event:
        sys.stdout.buffer.write(event["PayloadChunk"]["Payload"])
    elif "InvokeComplete" in event:
        complete = event["InvokeComplete"]
sys.stdout.buffer.flush()
sys.stderr.write(json.dumps({"status": response["StatusCode"], "complete": complete}) + "\n")
