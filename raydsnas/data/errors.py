"""Errors raised by `raydsnas.data`. Every message names the thing at fault: a config key, a shard,
a sample key or a storage URL, so a failure far away in a Ray worker still says what to fix."""


class DataError(Exception):
    """Base class of every error raised by `raydsnas.data`."""


class DataSpecError(DataError, ValueError):
    """A data configuration value is invalid (the message names key, value and what is allowed)."""


class StorageError(DataError):
    """A storage location cannot be used (the message names the URL)."""


class StorageOptionsError(StorageError, ValueError):
    """`storage_options` holds an unknown key or an invalid value."""


class MissingCredentialsError(StorageError):
    """No credentials were found for an object store that needs them."""


class EndpointUnreachableError(StorageError):
    """The object-store endpoint does not answer."""


class AccessDeniedError(StorageError):
    """The object store refused the credentials or the request."""


class ShardSetNotFoundError(StorageError):
    """The URI holds no shard set (no `_manifest.json`): missing, empty or wrong prefix."""


class SourceFolderError(DataError):
    """The image folder given to the shard writer is not usable (empty, no classes, ...)."""


class ShardFormatError(DataError):
    """A shard or the manifest does not match the shard format (schema, row count, version)."""


class LabelOutOfRangeError(ShardFormatError):
    """A label lies outside [0, num_classes)."""


class CorruptImageError(DataError):
    """An image cannot be decoded; raised unless `skip_corrupt` is on."""
