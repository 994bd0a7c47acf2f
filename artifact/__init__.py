"""The artifact contract between the calibration job and the service: the `CalibrationRecord`
schema (`schema`), the store on disk (`store`: read, list, publish, lock, `CURRENT`), file
digests (`hashing`), the serving graph's input and output names (`graph`), the flag rule
(`flags`), the pixel rules of image inputs (`pixels`), sampled traffic (`traffic`) and the
command lines' options from settings models (`cli_settings`).

A leaf package: plain data and file operations, no torch, nothing from the job or the service.
"""
