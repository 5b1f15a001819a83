"""The center part: the registry (PB) and the center HTTP API, and the registry's heartbeat check.

Children, in start order: ``center.registry`` and ``center.apiServer`` (``Listener``), then
``heartbeat`` (``RegistryHeartbeat``: the registry's expiry of silent engines).  Stopping runs
in reverse: the heartbeat check stops before the listeners close.  Nothing of the center is hot
on SIGHUP except the access control, which the root owns and the center API reads per request.
"""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from connmix_tx.auth import AccessControl
from connmix_tx.center.api import center_site
from connmix_tx.center.pb import registry_factory
from connmix_tx.center.registry import Registry
from connmix_tx.config import Config
from connmix_tx.listeners import Listener
from connmix_tx.lua.runtime import lua_version
from connmix_tx.metrics import CenterMeter, MetricsResource, own
from connmix_tx.reactors import IReactor


class RegistryHeartbeat(service.Service):
    """Runs the registry's periodic check of engine heartbeats while the tree runs."""

    def __init__(self, registry: Registry, interval: float) -> None:
        self.setName("heartbeat")
        self.registry = registry
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self.registry.start(self.interval)

    def stopService(self) -> None:
        self.registry.stop()
        super().stopService()


class CenterPart(service.MultiService):
    """Registry (PB) and center HTTP API."""

    def __init__(self, config: Config, reactor: IReactor, access: AccessControl) -> None:
        super().__init__()
        self.setName("center")
        cluster = config.cluster
        self.registry = Registry(reactor, cluster.heartbeat_timeout, cluster.number_reserve)
        self.metrics = CenterMeter(self.registry, lua_version())
        registry_log = Logger(namespace="connmix.registry")
        center_log = Logger(namespace="connmix.center")
        self.registry_listener = Listener(
            reactor, "center.registry", config.center.registry,
            registry_factory(self.registry, cluster.secret),
            lambda address: registry_log.info("start the registry server ({address})", address=address),
        )
        self.registry_listener.setServiceParent(self)
        self.api_listener = Listener(
            reactor, "center.apiServer", config.center.api_server,
            center_site(self.registry, access, config.center.api_server,
                        MetricsResource(own(self.metrics))),
            lambda address: center_log.info("start the center api server ({address})", address=address),
        )
        self.api_listener.setServiceParent(self)
        RegistryHeartbeat(self.registry, cluster.heartbeat_interval).setServiceParent(self)
