import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


# read, not imported: a build backend need not have the source tree on sys.path
VERSION = re.search(r'^__version__ = "([^"]+)"', read("mmproxy/__init__.py"), re.M).group(1)

setup(
    name="mmproxy",
    version=VERSION,
    description="IMAP4/POP3/SMTP front-end proxy, a drop-in for the Messaging Multiplexor (MMP)",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    # the top-level cfg/ (the *-def.cfg templates) is installed as mmproxy/templates/, where
    # mmproxy.config.generate.shipped_template finds it; in a source checkout it reads cfg/ itself
    packages=find_packages(include=["mmproxy", "mmproxy.*"]) + ["mmproxy.templates"],
    package_dir={"mmproxy.templates": "cfg"},
    package_data={"mmproxy.testing": ["*.schema"], "mmproxy.templates": ["*-def.cfg"]},
    python_requires=">=3.9",
    install_requires=[r for r in (line.split("#", 1)[0].strip() for line in read("requirements.txt").splitlines()) if r],
    # start-msg / stop-msg / refresh: the Messaging Multiplexor's command names (mmproxy/legacycmd.py)
    entry_points={"console_scripts": ["mmproxy = mmproxy.__main__:main", "start-msg = mmproxy.legacycmd:start_msg",
                                      "stop-msg = mmproxy.legacycmd:stop_msg", "refresh = mmproxy.legacycmd:refresh"]},
)
