"""Typed errors raised by the core library; each message names the problem and what to do."""


class CAHFPError(Exception):
    """Base class for every error the library raises on bad input."""


class ConfigError(CAHFPError):
    """A configuration file, override or option is invalid."""


class DatasetUnavailable(CAHFPError):
    """A dataset is not on disk and could not (or may not) be downloaded."""


class DatasetCorrupt(CAHFPError):
    """A dataset file exists but does not match its checksum or format."""


class UnknownName(CAHFPError):
    """A model, dataset, partitioner or method name is not registered."""


class ModelUnavailable(UnknownName):
    """A model given as ``package.module:callable`` cannot be imported or built here."""


class UnsupportedModel(CAHFPError):
    """A network contains a layer the pruning code cannot slice."""


class BudgetInfeasible(CAHFPError):
    """No plan fits the requested budget (even the smallest allowed submodel is too big)."""


class InvalidTask(CAHFPError):
    """A task this device cannot carry out as it is given (e.g. a training rule that does not
    describe the submodel it came with)."""


class InvalidUpdate(CAHFPError):
    """An update or payload is malformed: wrong keys, shapes, indices, dtypes or values."""


class DeviceUnavailable(CAHFPError):
    """The compute device asked for (``--device``, ``train.device``) is not on this machine."""
