"""Size bounds of the wire contract, in one place.

The broker's ``max_packet_size`` (broker_config/sidetune.conf) is set a little
above :data:`MAX_PAYLOAD_BYTES` so that the contract, not the broker, decides.
"""

SCHEMA_VERSION = 1

#: Largest payload a peer may send (an activation batch or an adapter).
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
#: Largest JSON header inside a payload (a job with many keys lives there).
MAX_HEADER_BYTES = 4 * 1024 * 1024
#: Samples in one job.
MAX_JOB_SAMPLES = 50_000
#: Samples in one activation batch.
MAX_BATCH_SAMPLES = 1024
#: Elements in one tensor (fp32 16 MiB).
MAX_TENSOR_ELEMENTS = 4 * 1024 * 1024
#: Dimensions of one tensor.
MAX_TENSOR_NDIM = 4
#: Length of free-text fields (reasons, details).
MAX_TEXT = 2000
