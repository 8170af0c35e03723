import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Field(_message.Message):
    __slots__ = ("name", "export_as")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPORT_AS_FIELD_NUMBER: _ClassVar[int]
    name: str
    export_as: str
    def __init__(self, name: _Optional[str] = ..., export_as: _Optional[str] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("connection_id", "format", "limit", "fields", "request_id", "changed_since", "filter")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FORMAT_UNSPECIFIED: _ClassVar[ExportRequest.Format]
        CSV: _ClassVar[ExportRequest.Format]
        JSON: _ClassVar[ExportRequest.Format]
        PARQUET: _ClassVar[ExportRequest.Format]
    FORMAT_UNSPECIFIED: ExportRequest.Format
    CSV: ExportRequest.Format
    JSON: ExportRequest.Format
    PARQUET: ExportRequest.Format
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGED_SINCE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    format: ExportRequest.Format
    limit: int
    fields: _containers.RepeatedCompositeFieldContainer[Field]
    request_id: str
    changed_since: str
    filter: str
    def __init__(self, connection_id: _Optional[str] = ..., format: _Optional[_Union[ExportRequest.Format, str]] = ..., limit: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[Field, _Mapping]]] = ..., request_id: _Optional[str] = ..., changed_since: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "type", "status", "created_at", "updated_at", "connection_id", "connection", "format", "limit", "fields", "percentage_done", "time_left_seconds", "users_written", "users_total", "location", "location_expires_at", "error", "expires_at", "started_at", "finished_at", "request_id", "size_bytes", "version", "watermark", "sha256", "changed_since", "filter", "status_details")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[Job.Status]
        PENDING: _ClassVar[Job.Status]
        PROCESSING: _ClassVar[Job.Status]
        COMPLETED: _ClassVar[Job.Status]
        FAILED: _ClassVar[Job.Status]
        CANCELLED: _ClassVar[Job.Status]
        EXPIRED: _ClassVar[Job.Status]
    STATUS_UNSPECIFIED: Job.Status
    PENDING: Job.Status
    PROCESSING: Job.Status
    COMPLETED: Job.Status
    FAILED: Job.Status
    CANCELLED: Job.Status
    EXPIRED: Job.Status
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    PERCENTAGE_DONE_FIELD_NUMBER: _ClassVar[int]
    TIME_LEFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USERS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    USERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    LOCATION_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHANGED_SINCE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    status: Job.Status
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    connection_id: str
    connection: str
    format: ExportRequest.Format
    limit: int
    fields: _containers.RepeatedCompositeFieldContainer[Field]
    percentage_done: int
    time_left_seconds: int
    users_written: int
    users_total: int
    location: str
    location_expires_at: _timestamp_pb2.Timestamp
    error: str
    expires_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    request_id: str
    size_bytes: int
    version: int
    watermark: str
    sha256: str
    changed_since: str
    filter: str
    status_details: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., status: _Optional[_Union[Job.Status, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., connection_id: _Optional[str] = ..., connection: _Optional[str] = ..., format: _Optional[_Union[ExportRequest.Format, str]] = ..., limit: _Optional[int] = ..., fields: _Optional[_Iterable[_Union[Field, _Mapping]]] = ..., percentage_done: _Optional[int] = ..., time_left_seconds: _Optional[int] = ..., users_written: _Optional[int] = ..., users_total: _Optional[int] = ..., location: _Optional[str] = ..., location_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., version: _Optional[int] = ..., watermark: _Optional[str] = ..., sha256: _Optional[str] = ..., changed_since: _Optional[str] = ..., filter: _Optional[str] = ..., status_details: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "after_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    after_version: int
    def __init__(self, id: _Optional[str] = ..., after_version: _Optional[int] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "status")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    status: Job.Status
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., status: _Optional[_Union[Job.Status, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListConnectionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListConnectionsResponse(_message.Message):
    __slots__ = ("connections", "next_page_token")
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[Connection]
    next_page_token: str
    def __init__(self, connections: _Optional[_Iterable[_Union[Connection, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Connection(_message.Message):
    __slots__ = ("id", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...
