from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "connmix", "connmix_tx.tap", "Distributed WebSocket long-connection engine scripted in Lua", "connmix"
)
