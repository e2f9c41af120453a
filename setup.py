"""Packaging for mailcow-smtp-api: the library and its twistd plugin dropin."""

from setuptools import find_packages, setup

setup(
    name="mailcow-smtp-api",
    version="0.1.0",
    description="HTTP send API sidecar for mailcow: POST /api/v1/send/email, submitted over SMTP to postfix",
    python_requires=">=3.11",
    package_dir={"": "src"},
    # twisted/plugins has no __init__.py on purpose: it is a namespace that twistd scans.
    packages=find_packages("src") + ["twisted.plugins"],
    package_data={"mailcow_smtp_api": ["openapi.json", "py.typed"]},
    install_requires=[
        "Twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "attrs>=23.1",
        "pyOpenSSL>=24.0",
        "service-identity>=24.1",
        "idna>=3.6",
        "PyMySQL>=1.1",
        "bcrypt>=4.1",
        "argon2-cffi>=23.1",
        "libpass>=1.9",
        "prometheus-client>=0.20",
        "txredisapi>=1.6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "pyyaml>=6",
            "schemathesis>=4",
            "types-PyYAML",
            "standardwebhooks>=1.1",
            # Real provider clients for tests/integration/test_clients.py: anymail's Mailgun and
            # Postmark backends run inside a Django configured in the test.
            "django>=4.2",
            "django-anymail>=13",
        ],
        # bench/cpu.py --profile: a CPU-time profiler (bench/profiled.py).
        "bench": ["yappi>=1.6"],
    },
    entry_points={
        "console_scripts": ["smtpapi-admin = mailcow_smtp_api.cli:main"],
    },
)
