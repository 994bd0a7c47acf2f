"""The artifact contract between the calibration job and the service: the `CalibrationRecord`
schema (`schema`), the store on disk (`store`: read, list, publish, lock, `CURRENT`), file
digests (`hashing`) and the serving graph's input and output names (`graph`).

A leaf package: plain data and file operations, no torch, nothing from the job or the service.
"""
