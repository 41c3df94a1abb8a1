from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_CO_SERVE: _ClassVar[Placement]
    PLACEMENT_DEDICATED: _ClassVar[Placement]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_CO_SERVE: Placement
PLACEMENT_DEDICATED: Placement
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class Record(_message.Message):
    __slots__ = ("prompt", "completion")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("path", "task", "records", "eval_path", "eval_records")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_PATH_FIELD_NUMBER: _ClassVar[int]
    EVAL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    task: str
    records: InlineRecords
    eval_path: str
    eval_records: InlineRecords
    def __init__(self, path: _Optional[str] = ..., task: _Optional[str] = ..., records: _Optional[_Union[InlineRecords, _Mapping]] = ..., eval_path: _Optional[str] = ..., eval_records: _Optional[_Union[InlineRecords, _Mapping]] = ...) -> None: ...

class InlineRecords(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ...) -> None: ...

class TrainingParams(_message.Message):
    __slots__ = ("steps", "batch_size", "grad_accum", "lr", "max_length", "seed", "checkpoint_every", "eval_every")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    max_length: int
    seed: int
    checkpoint_every: int
    eval_every: int
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., grad_accum: _Optional[int] = ..., lr: _Optional[float] = ..., max_length: _Optional[int] = ..., seed: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., eval_every: _Optional[int] = ...) -> None: ...

class FineTuneJobSpec(_message.Message):
    __slots__ = ("output_name", "method", "method_params", "dataset", "training", "base_model", "quantize", "aliases", "placement", "serve_checkpoints_as")
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SERVE_CHECKPOINTS_AS_FIELD_NUMBER: _ClassVar[int]
    output_name: str
    method: str
    method_params: _struct_pb2.Struct
    dataset: Dataset
    training: TrainingParams
    base_model: str
    quantize: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    placement: Placement
    serve_checkpoints_as: str
    def __init__(self, output_name: _Optional[str] = ..., method: _Optional[str] = ..., method_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., dataset: _Optional[_Union[Dataset, _Mapping]] = ..., training: _Optional[_Union[TrainingParams, _Mapping]] = ..., base_model: _Optional[str] = ..., quantize: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., placement: _Optional[_Union[Placement, str]] = ..., serve_checkpoints_as: _Optional[str] = ...) -> None: ...

class FineTuneJob(_message.Message):
    __slots__ = ("id", "spec", "state", "step", "total_steps", "loss", "tokens_per_s", "error", "mlflow_run_id", "adapter_ref", "metrics", "created_at", "updated_at", "placement")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_REF_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: FineTuneJobSpec
    state: JobState
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    error: str
    mlflow_run_id: str
    adapter_ref: str
    metrics: _containers.ScalarMap[str, float]
    created_at: float
    updated_at: float
    placement: Placement
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[FineTuneJobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., error: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., adapter_ref: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., placement: _Optional[_Union[Placement, str]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: FineTuneJobSpec
    def __init__(self, spec: _Optional[_Union[FineTuneJobSpec, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[FineTuneJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[FineTuneJob, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
