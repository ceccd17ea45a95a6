"""The MQTT link both apps use: the paho-mqtt client wrapper and its spooling inbox."""
