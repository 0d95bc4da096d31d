"""Drives the emulator's Lambda MicroVMs control plane with boto3 (a client
that is not ours): run, get, auth token, a request through the endpoint,
terminate, and two errors. Prints one JSON report to stdout. Exits 77 when
this botocore does not know the lambda-microvms service.

usage: boto3_microvms.py ENDPOINT IMAGE
"""
import json
import sys
import time
import urllib.request

import boto3
import botocore.exceptions
import botocore.session

if "lambda-microvms" not in botocore.session.get_session().get_available_services():
    sys.stderr.write(f"botocore {botocore.__version__} has no lambda-microvms\n")
    sys.exit(77)

endpoint, image = sys.argv[1], sys.argv[2]
client = boto3.client(
    "lambda-microvms",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)


def error_code(call):
    try:
        call()
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
    return None


def until_settled(vm_id):
    """Polls GetMicrovm, as a client must after RunMicrovm answered PENDING."""
    delay = 0.02
    for _ in range(200):
        got = client.get_microvm(microvmIdentifier=vm_id)
        if got["state"] != "PENDING":
            return got
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    raise SystemExit(f"microVM {vm_id} still PENDING")


run = client.run_microvm(
    imageIdentifier=image, runHookPayload="from boto3", maximumDurationInSeconds=120
)
vm_id = run["microvmId"]
got = until_settled(vm_id)
# The payload is optional in the API: a microVM starts without one too.
no_payload = client.run_microvm(imageIdentifier=image, maximumDurationInSeconds=120)
no_payload_state = until_settled(no_payload["microvmId"])["state"]
client.terminate_microvm(microvmIdentifier=no_payload["microvmId"])
token = client.create_microvm_auth_token(
    microvmIdentifier=vm_id, expirationInMinutes=5, allowedPorts=[{"port": 8080}]
)["authToken"]
request = urllib.request.Request(got["endpoint"] + "/echo", headers=dict(token))
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(request, timeout=30) as resp:
    echo = json.load(resp)
client.terminate_microvm(microvmIdentifier=vm_id)
terminated = client.get_microvm(microvmIdentifier=vm_id)
listed = client.list_microvms()["items"]

report = {
    "run_state": run["state"],
    "state_after_polling": got["state"],
    "no_payload_state": no_payload_state,
    "started_at_is_datetime": hasattr(run["startedAt"], "year"),
    "echo_run": echo["run"],
    "proxy_headers_seen": sum(
        1 for k in echo["headers"] if k.lower().startswith("x-aws-proxy-")
    ),
    "terminated_state": terminated["state"],
    "listed": [item["microvmId"] for item in listed],
    "unknown_image_error": error_code(
        lambda: client.run_microvm(imageIdentifier="no-such-image")
    ),
    "oversized_payload_error": error_code(
        lambda: client.run_microvm(imageIdentifier=image, runHookPayload="x" * 16385)
    ),
}
json.dump(report, sys.stdout)
