from setuptools import find_packages, setup

from mmproxy import __version__

setup(
    name="mmproxy",
    version=__version__,
    description="IMAP4/POP3/SMTP front-end proxy, a drop-in for the Messaging Multiplexor (MMP)",
    packages=find_packages(include=["mmproxy", "mmproxy.*"]),
    package_data={"mmproxy.testing": ["*.schema"]},
    python_requires=">=3.9",
    install_requires=[l.strip() for l in open("requirements.txt") if l.strip() and not l.startswith("#")],
    entry_points={"console_scripts": ["mmproxy = mmproxy.__main__:main"]},
)
