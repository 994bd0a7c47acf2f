"""Dataset loaders, one module per source: Fashion-MNIST IDX files (`idx`), CIFAR-10 python
batches (`cifar`), `.npz` archives (`npz`) and image folders (`image_folder`). Each returns the
one `Dataset` type (`dataset`); `models.data.load_dataset` picks the loader for a name."""
