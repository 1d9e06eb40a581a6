"""Legacy MMP configuration: the parameter registry, the .cfg reader, vdmap.cfg, loading and checks.

Depends on the standard library only, so every other module may import it.
"""
from mmproxy.config.cfgfile import Problem
from mmproxy.config.loader import Config, ServiceConfig, ServiceEntry, load_config, summary
from mmproxy.config.params import PARAMS, Param, lookup
from mmproxy.config.types import Endpoint, LdapURL, ServiceSpec
from mmproxy.config.vdmap import VirtualDomains

__all__ = ["Config", "Endpoint", "LdapURL", "PARAMS", "Param", "Problem", "ServiceConfig", "ServiceEntry",
           "ServiceSpec", "VirtualDomains", "load_config", "lookup", "summary"]
