-- Whether the listener's stream may be made a synchronous standby (pg/standbys.py).
SELECT current_setting('synchronous_standby_names')
