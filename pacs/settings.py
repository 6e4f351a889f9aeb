"""The one settings object that chooses every backend.

Loaded in the CLI, the API's ``create_app`` and Alembic's ``env.py`` — never at
import time.  Values come from, in order of precedence: keyword arguments,
``PACS_*`` environment variables (nested sections use ``__``, for example
``PACS_STORAGE__BACKEND=hdfs``; the most used ones also have short aliases such
as ``PACS_HDFS_URL``), a TOML config file named by ``PACS_CONFIG``, then the
defaults below, which give the embedded default: local files and SQLite under
one data directory.
"""

from __future__ import annotations

import enum
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class StorageBackend(str, enum.Enum):
    LOCAL = "local"
    HDFS = "hdfs"


class HdfsClient(str, enum.Enum):
    NATIVE = "native"  # hdfs-native: the NameNode/DataNode RPC protocols, no JVM
    WEBHDFS = "webhdfs"  # the `hdfs` package over WebHDFS (HTTP)


class HdfsPackWriter(str, enum.Enum):
    PIPELINE = "pipeline"  # pacs.storage.hdfswriter: one packet per hsync'ed record, no NameNode call
    NATIVE = "native"  # hdfs-native's writer: a packet and a NameNode fsync more per record


class DuplicatePolicy(str, enum.Enum):
    """What to do when a SOP Instance UID arrives again with different bytes.

    The same bytes again are always a no-op success.
    """

    KEEP_FIRST = "keep-first"  # answer success, keep what is stored, log a warning
    OVERWRITE = "overwrite"  # the new bytes become current; the old location is recorded
    REJECT = "reject"  # answer a failure status


class StorageSettings(BaseModel):
    backend: StorageBackend = StorageBackend.LOCAL
    # Local backend: root of the bulk store; defaults to <data_dir>/store.
    local_root: Path | None = None
    # HDFS backend.
    hdfs_url: str = "hdfs://127.0.0.1:19000"
    # The NameNode's HTTP address: the WebHDFS client's, and where the native
    # client gets block lists to read packs straight from the DataNodes.
    webhdfs_url: str = "http://127.0.0.1:19870"
    hdfs_client: HdfsClient = HdfsClient.NATIVE
    hdfs_root: str = "/pacs"
    hdfs_user: str = "pacs"
    replication: int = Field(default=3, ge=1)
    # Deadline of each HDFS call (create, one chunk written or read, hsync, close);
    # a call past it fails and the store is retried on a new pipeline.
    hdfs_timeout_s: float = Field(default=30.0, gt=0)
    # hsync before close makes every DataNode of the pipeline fsync the block.
    # A cluster with dfs.datanode.synconclose=true fsyncs on close anyway and
    # may turn this off (one round trip less per object).
    hdfs_hsync: bool = True
    # What appends to packs on HDFS (with hdfs_client=native): the archive's
    # own write pipeline, or hdfs-native's writer.  docs/storage.md compares them.
    hdfs_pack_writer: HdfsPackWriter = HdfsPackWriter.PIPELINE
    block_size_mb: int = Field(default=256, ge=1)
    # Packing.  Where the backend can append (local; HDFS through hdfs-native),
    # objects go straight into append-only packs: one write and one flush
    # (fdatasync / hsync) each, written once.  Else (WebHDFS, or
    # append_packs=false) they land one file each and are compacted into packs.
    # None: on wherever the backend can append.
    append_packs: bool | None = None
    # An appended pack nobody has written to for this long is sealed (closed):
    # on HDFS, only closed files can be read without WebHDFS.
    pack_idle_seal_s: float = Field(default=30.0, gt=0)
    pack_target_mb: int = Field(default=256, ge=1)
    # Compaction starts once a pack's worth of bytes, or this many instances,
    # wait in the landing area ...
    landing_compact_at: int = Field(default=1024, ge=1)
    # ... and ingest waits for it (back-pressure) once this many do.
    landing_max_files: int = Field(default=4096, ge=2)
    # Landed bytes are also compacted once they are this old, whatever their count.
    landing_max_age_s: float = Field(default=300.0, gt=0)
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    # Largest object accepted by ingest (bytes); larger ones are refused.
    max_object_mb: int = Field(default=4096, ge=1)

    @model_validator(mode="after")
    def _append_needs_a_backend_that_appends(self) -> StorageSettings:
        if self.append_packs and not self._can_append:
            raise ValueError(
                f"storage.append_packs=true needs a backend that can append to files (local, or hdfs with "
                f"hdfs_client=native), got backend {self.backend.value!r} with hdfs_client "
                f"{self.hdfs_client.value!r}; there objects land and are compacted"
            )
        return self

    @property
    def _can_append(self) -> bool:
        return self.backend is StorageBackend.LOCAL or self.hdfs_client is HdfsClient.NATIVE

    @property
    def uses_append_packs(self) -> bool:
        """Whether ingest appends to packs (else objects land and are compacted)."""
        return self.append_packs is not False and self._can_append


class IndexSettings(BaseModel):
    # SQLAlchemy URL; None means SQLite at <data_dir>/index.sqlite.
    url: str | None = None
    pool_size: int = Field(default=5, ge=1)
    echo_sql: bool = False


class DicomSettings(BaseModel):
    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    # Seconds an association may stay silent before it is aborted (ACSE and
    # DIMSE replies are waited for as long).
    network_timeout_s: float = Field(default=60, gt=0)
    # C-FIND answers at most this many matches (a Success follows them).
    max_find_results: int = Field(default=10_000, ge=1)
    # Associations one worker process serves at once, counting those whose
    # A-ASSOCIATE-RQ has come; one more is rejected as transient (local limit
    # exceeded), which a peer may retry.  Connections that have not yet sent
    # their request do not count (pacs.net.scp.MAX_WAITING_CONNECTIONS).
    max_associations: int = Field(default=32, ge=1)
    # Accept associations only from AEs in the remote AE table (title and host).
    # None: on in cluster mode (HDFS storage), off in the embedded default.
    require_known_ae: bool | None = None
    # Accept C-STORE of SOP classes pynetdicom does not know (private or newer
    # than it), stored as received like any other; off: such contexts are rejected.
    accept_unknown_sop_classes: bool = False
    # TLS: with a certificate and key the port speaks DICOM over TLS only;
    # with a CA file too, peers must present a certificate signed by it.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None


class SparkSettings(BaseModel):
    """Where processing jobs (reconstruction, denoising) run; see pacs.spark."""

    # local[*] (every core of this machine), local[N], or a standalone master
    # spark://HOST:PORT such as the one `deploy/spark.sh up` starts.
    master: str = "local[*]"
    # JVM heap of the driver: it holds the tasks' inputs until they are sent
    # and the results it collects (a 512^3 float32 volume is 512 MiB).
    driver_memory: str = "4g"
    # Largest total of results collected by one action (spark.driver.maxResultSize).
    max_result_size: str = "4g"
    # JVM heap of each executor on a cluster (the Python workers are outside it).
    executor_memory: str = "1g"
    # Largest task message (spark.rpc.message.maxSize, MiB, at most 2047): a
    # reconstruction task carries its band of projection rows.
    max_task_mb: int = Field(default=256, ge=1, le=2047)
    # Rows per Arrow batch of mapInPandas-style jobs (each row may hold an image).
    arrow_batch_rows: int = Field(default=64, ge=1)


class Settings(BaseSettings):
    """Everything the archive's processes need to know to wire themselves."""

    model_config = SettingsConfigDict(
        env_prefix="PACS_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    data_dir: Path = Field(default=Path("pacs-data"))
    log_level: str = "INFO"
    storage: StorageSettings = Field(default_factory=StorageSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def index_url(self) -> str:
        if self.index.url:
            return self.index.url
        return f"sqlite:///{self.data_dir / 'index.sqlite'}"

    @property
    def require_known_ae(self) -> bool:
        if self.dicom.require_known_ae is not None:
            return self.dicom.require_known_ae
        return self.storage.backend is StorageBackend.HDFS

    @property
    def local_store_root(self) -> Path:
        return self.storage.local_root or (self.data_dir / "store")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _ShortEnvAliases(settings_cls),
            env_settings,
            _TomlFile(settings_cls),
        )


# Short environment names for the settings operators set most, so that
# `deploy/*.sh env` output can be exported as it is.
_SHORT_ALIASES: dict[str, tuple[str, ...]] = {
    "PACS_HDFS_URL": ("storage", "hdfs_url"),
    "PACS_HDFS_WEBHDFS_URL": ("storage", "webhdfs_url"),
    "PACS_STORAGE_BACKEND": ("storage", "backend"),
    "PACS_REPLICATION": ("storage", "replication"),
    "PACS_INDEX_URL": ("index", "url"),
    "PACS_AET": ("dicom", "ae_title"),
    "PACS_DICOM_PORT": ("dicom", "port"),
    "PACS_SPARK_MASTER": ("spark", "master"),
}


class _ShortEnvAliases(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for env_name, (section, key) in _SHORT_ALIASES.items():
            if env_name in os.environ:
                values.setdefault(section, {})[key] = os.environ[env_name]
        return values


class _TomlFile(PydanticBaseSettingsSource):
    """The optional config file named by ``PACS_CONFIG`` (TOML, same nesting)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("PACS_CONFIG")
        if not path:
            return {}
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)
        except FileNotFoundError:
            raise ValueError(f"PACS_CONFIG names {path!r}, which does not exist") from None


def load_settings(**overrides: Any) -> Settings:
    """Build the settings of this process from its environment and config file."""
    return Settings(**overrides)


__all__ = [
    "DicomSettings",
    "DuplicatePolicy",
    "HdfsClient",
    "IndexSettings",
    "Settings",
    "SparkSettings",
    "StorageBackend",
    "StorageSettings",
    "load_settings",
]
