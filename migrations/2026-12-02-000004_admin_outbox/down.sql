DROP TABLE admin_outbox;
