"""The vehicle bus: ``payloads`` (the MQTT JSON formats), ``outbox`` (the durable event queue), ``mqtt``
(the broker connection) and ``remote`` (operators' ``config/set`` requests).
"""
