"""Registry stage: versions, lineage and headline metrics on MLflow."""

from tuneloop.registry.store import (
    HEADLINE,
    adapter_paths,
    list_versions,
    production_version,
    register,
    training_tracking,
    version_dir,
)

__all__ = ["HEADLINE", "adapter_paths", "list_versions", "production_version", "register", "training_tracking", "version_dir"]
