"""The one thing pyproject.toml cannot say in a stable way: the native BPE encoder
(tokenizers_bpe/_native_bpe.c), a C extension built at install. It is optional: without a C compiler
the package still installs and encodes through tiktoken (the same ids, more slowly)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tokenizers_bpe._native_bpe",
            sources=["tokenizers_bpe/_native_bpe.c"],
            depends=["tokenizers_bpe/_unicode_classes.h"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
