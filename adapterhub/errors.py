"""User-facing errors: each one is reported as a single clear line, never a traceback."""

from __future__ import annotations


class AdapterHubError(Exception):
    """Base class for errors caused by user input (files, references, parameters)."""


class DatasetError(AdapterHubError):
    """A dataset file is missing or malformed (the message names the line)."""


class CheckpointError(AdapterHubError):
    """A base-model checkpoint directory is missing, unreadable or unsupported."""


class AdapterError(AdapterHubError):
    """An adapter directory or tensor file is missing, corrupt or not safetensors."""


class IncompatibleAdapterError(AdapterError):
    """An adapter does not fit the base model (target modules or shapes differ)."""


class RegistryError(AdapterHubError):
    """A registry reference cannot be resolved, or the registry cannot be reached."""
