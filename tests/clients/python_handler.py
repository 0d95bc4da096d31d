"""A plain Python Lambda handler, run by the official Python runtime
interface client (awslambdaric), not by our agent."""


def handle(event, context):
    return {
        "echo": event,
        "function": context.function_name,
        "request_id": context.aws_request_id,
        "time_left_ms": context.get_remaining_time_in_millis(),
    }


def fail(event, context):
    raise ValueError("handler failed on purpose")
