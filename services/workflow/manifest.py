"""The workflow engine's declaration: starts, signals and queries in; its own work queue of
wake-ups (a durable consumer); tool calls, graph runs and events out; its streams and buckets."""

from pydantic import JsonValue

from contracts import subjects
from contracts.envelope import Kind, RunEvent, WorkflowQuery, WorkflowSignal, WorkflowStart, WorkflowTask
from services.runtime.census import watch_api
from services.runtime.manifest import Consume, Durable, Manifest, Publishes, kv_api, stream_api
from services.workflow.settings import WorkflowSettings
from services.workflow.store import BUCKETS, HISTORY_STREAM, RUNS_BUCKET, TASKS_STREAM

# A wake-up held by a replica that died goes to another after this long (the replica keeps it
# with in-progress acknowledgements while it works, every half of it).
TASK_ACK_WAIT_S = 2.0

MANIFEST = Manifest(
    name="workflow",
    summary="Durable workflow runs on JetStream: recorded steps, retries, validation, timers, approvals, sagas",
    consumes=(
        Consume(
            "start",
            subjects.WORKFLOW_STARTS,
            Kind.WORKFLOW_START,
            WorkflowStart,
            "Start a run of a workflow the tenant's routes name (from the router, with the client's reply)",
        ),
        Consume(
            "signal",
            subjects.WORKFLOW_SIGNALS,
            Kind.WORKFLOW_SIGNAL,
            WorkflowSignal,
            "A signal (an approval) or a cancellation for a run of the sender's tenant; "
            "t.<tenant>.workflow.signal.<principal>[.<scope>]",
            tenant_facing=True,
        ),
        Consume(
            "query",
            subjects.WORKFLOW_QUERIES,
            Kind.WORKFLOW_QUERY,
            WorkflowQuery,
            "List the tenant's runs or show one run's history",
            tenant_facing=True,
        ),
        Durable(
            "task",
            TASKS_STREAM,
            subjects.WORKFLOW_TASKS,
            Kind.WORKFLOW_TASK,
            WorkflowTask,
            "Drive a run on (a start, a signal, a timer, a replica that died)",
            ack_wait_s=TASK_ACK_WAIT_S,
            max_deliver=-1,  # a run is never dropped; a step that kills replicas fails the run instead
        ),
    ),
    publishes=(
        Publishes(
            subjects.ALL_EVENTS,
            "Progress of one run (started, step_started, step_completed, step_retrying, waiting, "
            "compensating, completed, failed, cancelled); a tenant may subscribe",
            RunEvent,
            address="t.{tenant}.events.{principal}.{run_id}",
        ),
        Publishes(
            subjects.WORKFLOW_HISTORY,
            "A run's history: each message a JSON array of its next events, appended only after the last "
            f"(JetStream stream {HISTORY_STREAM}; no tenant may read or write it)",
            list[dict[str, JsonValue]],
            envelope=False,
        ),
        Publishes(subjects.WORKFLOW_TASKS, "A wake-up of one run (JetStream work queue)", WorkflowTask),
        Publishes(
            subjects.WORKFLOW_TIMERS,
            f"A run's next timer (JetStream stream {TASKS_STREAM}): a wake-up scheduled with the header "
            "Nats-Schedule @at, delivered to the run's task subject",
            WorkflowTask,
        ),
    ),
    requests=(subjects.TOOL_CALLS, subjects.GRAPH_RUNS),
    jetstream=(
        stream_api(HISTORY_STREAM)
        + stream_api(TASKS_STREAM)
        + tuple(subject for bucket in BUCKETS for subject in kv_api(bucket))
        + watch_api(RUNS_BUCKET)  # the census of open runs (services/runtime/census.py)
        + ("$JS.API.INFO",)
    ),
    settings=WorkflowSettings,
)
