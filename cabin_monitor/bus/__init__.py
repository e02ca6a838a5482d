"""The vehicle bus: ``payloads`` (the MQTT JSON formats and their assembly), ``sinks`` (where the pipeline's
output goes; stdout), ``outbox`` (the durable event queue), ``mqtt`` (the broker connection) and ``remote``
(operators' ``config/*`` requests: the dispatch table, the request queue and its worker; the rules in force
themselves are ``rules.in_force``).
"""
