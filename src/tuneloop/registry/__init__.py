"""Registry stage: versions, lineage and headline metrics on MLflow; promotion and rollback of the version
in production."""

from tuneloop.registry.promotion import history, promote, promotion_refusal, rollback, rollback_target
from tuneloop.registry.store import (
    HEADLINE,
    SERVING_CONTRACT,
    adapter_paths,
    delete_served,
    find_version,
    list_versions,
    production_version,
    register,
    training_tracking,
    version_dir,
    version_run,
)

__all__ = [
    "HEADLINE", "SERVING_CONTRACT", "adapter_paths", "delete_served", "find_version", "list_versions", "production_version", "register", "training_tracking",
    "version_dir", "version_run", "history", "promote", "promotion_refusal", "rollback", "rollback_target",
]
