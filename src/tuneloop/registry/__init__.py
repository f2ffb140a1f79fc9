"""Registry stage: versions, lineage and headline metrics on MLflow."""

from tuneloop.registry.store import (
    HEADLINE,
    SERVING_CONTRACT,
    adapter_paths,
    find_version,
    list_versions,
    production_version,
    register,
    training_tracking,
    version_dir,
    version_run,
)

__all__ = [
    "HEADLINE", "SERVING_CONTRACT", "adapter_paths", "find_version", "list_versions", "production_version", "register", "training_tracking",
    "version_dir", "version_run",
]
