"""The subset of mailcow's schema the sidecar reads (mailcow.md section 2), for MariaDB and SQLite.

The MariaDB statements use mailcow's column types and collation (``utf8mb4_general_ci``, which makes
every comparison case-insensitive); they are used by tests and the test bed to build scratch
databases. The SQLite statements create the embedded database with ``COLLATE NOCASE`` on every text
column so that the same queries compare the same way. Pure core.
"""

from __future__ import annotations

# table -> columns the sidecar reads; start-up checks these exist.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "domain": ("domain", "active"),
    "mailbox": ("username", "password", "local_part", "domain", "kind", "attributes", "authsource", "active"),
    "alias": ("id", "address", "goto", "domain", "sender_allowed", "active"),
    "alias_domain": ("alias_domain", "target_domain", "active"),
    "sender_acl": ("id", "logged_in_as", "send_as", "external"),
    "api": ("api_key", "allow_from", "skip_ip_check", "access", "active"),
    "app_passwd": ("id", "mailbox", "password", "smtp_access", "active"),
}

MARIADB_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS `domain` (
  `domain` VARCHAR(255) NOT NULL,
  `active` TINYINT(1) NOT NULL DEFAULT 1,
  PRIMARY KEY (`domain`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
    """CREATE TABLE IF NOT EXISTS `mailbox` (
  `username` VARCHAR(255) NOT NULL,
  `password` VARCHAR(255) NOT NULL,
  `name` VARCHAR(255),
  `local_part` VARCHAR(255) NOT NULL,
  `domain` VARCHAR(255) NOT NULL,
  `kind` VARCHAR(100) NOT NULL DEFAULT '',
  `attributes` JSON,
  `authsource` ENUM('mailcow','keycloak','generic-oidc','ldap') DEFAULT 'mailcow',
  `active` TINYINT(1) NOT NULL DEFAULT 1,
  PRIMARY KEY (`username`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
    """CREATE TABLE IF NOT EXISTS `alias` (
  `id` INT NOT NULL AUTO_INCREMENT,
  `address` VARCHAR(255) NOT NULL,
  `goto` TEXT NOT NULL,
  `domain` VARCHAR(255) NOT NULL,
  `sogo_visible` TINYINT(1) NOT NULL DEFAULT 1,
  `internal` TINYINT(1) NOT NULL DEFAULT 0,
  `sender_allowed` TINYINT(1) NOT NULL DEFAULT 1,
  `active` TINYINT(1) NOT NULL DEFAULT 1,
  PRIMARY KEY (`id`),
  UNIQUE KEY `address` (`address`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
    """CREATE TABLE IF NOT EXISTS `alias_domain` (
  `alias_domain` VARCHAR(255) NOT NULL,
  `target_domain` VARCHAR(255) NOT NULL,
  `active` TINYINT(1) NOT NULL DEFAULT 1,
  PRIMARY KEY (`alias_domain`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
    """CREATE TABLE IF NOT EXISTS `sender_acl` (
  `id` INT NOT NULL AUTO_INCREMENT,
  `logged_in_as` VARCHAR(255) NOT NULL,
  `send_as` VARCHAR(255) NOT NULL,
  `external` TINYINT(1) NOT NULL DEFAULT 0,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
    """CREATE TABLE IF NOT EXISTS `api` (
  `api_key` VARCHAR(255) NOT NULL,
  `allow_from` VARCHAR(512) NOT NULL DEFAULT '',
  `skip_ip_check` TINYINT(1) NOT NULL DEFAULT 0,
  `created` DATETIME(0) NOT NULL DEFAULT NOW(0),
  `access` ENUM('ro','rw') NOT NULL DEFAULT 'rw',
  `active` TINYINT(1) NOT NULL DEFAULT 1,
  PRIMARY KEY (`api_key`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
    """CREATE TABLE IF NOT EXISTS `app_passwd` (
  `id` INT NOT NULL AUTO_INCREMENT,
  `name` VARCHAR(255) NOT NULL DEFAULT '',
  `mailbox` VARCHAR(255) NOT NULL,
  `domain` VARCHAR(255) NOT NULL DEFAULT '',
  `password` VARCHAR(255) NOT NULL,
  `imap_access` TINYINT(1) NOT NULL DEFAULT 1,
  `smtp_access` TINYINT(1) NOT NULL DEFAULT 1,
  `active` TINYINT(1) NOT NULL DEFAULT 1,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
    """CREATE TABLE IF NOT EXISTS `versions` (
  `application` VARCHAR(255) NOT NULL,
  `version` VARCHAR(100) NOT NULL,
  PRIMARY KEY (`application`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci""",
)

SQLITE_TABLES: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS domain (
  domain TEXT NOT NULL COLLATE NOCASE PRIMARY KEY,
  active INTEGER NOT NULL DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS mailbox (
  username TEXT NOT NULL COLLATE NOCASE PRIMARY KEY,
  password TEXT NOT NULL,
  name TEXT COLLATE NOCASE,
  local_part TEXT NOT NULL COLLATE NOCASE,
  domain TEXT NOT NULL COLLATE NOCASE,
  kind TEXT NOT NULL DEFAULT '' COLLATE NOCASE,
  attributes TEXT NOT NULL DEFAULT '{}',
  authsource TEXT NOT NULL DEFAULT 'mailcow' COLLATE NOCASE,
  active INTEGER NOT NULL DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS alias (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  address TEXT NOT NULL COLLATE NOCASE UNIQUE,
  goto TEXT NOT NULL COLLATE NOCASE,
  domain TEXT NOT NULL COLLATE NOCASE,
  sogo_visible INTEGER NOT NULL DEFAULT 1,
  internal INTEGER NOT NULL DEFAULT 0,
  sender_allowed INTEGER NOT NULL DEFAULT 1,
  active INTEGER NOT NULL DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS alias_domain (
  alias_domain TEXT NOT NULL COLLATE NOCASE PRIMARY KEY,
  target_domain TEXT NOT NULL COLLATE NOCASE,
  active INTEGER NOT NULL DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS sender_acl (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  logged_in_as TEXT NOT NULL COLLATE NOCASE,
  send_as TEXT NOT NULL COLLATE NOCASE,
  external INTEGER NOT NULL DEFAULT 0
)""",
    """CREATE TABLE IF NOT EXISTS api (
  api_key TEXT NOT NULL COLLATE NOCASE PRIMARY KEY,
  allow_from TEXT NOT NULL DEFAULT '',
  skip_ip_check INTEGER NOT NULL DEFAULT 0,
  created TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
  access TEXT NOT NULL DEFAULT 'rw' CHECK (access IN ('ro', 'rw')),
  active INTEGER NOT NULL DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS app_passwd (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL DEFAULT '',
  mailbox TEXT NOT NULL COLLATE NOCASE,
  domain TEXT NOT NULL DEFAULT '' COLLATE NOCASE,
  password TEXT NOT NULL,
  imap_access INTEGER NOT NULL DEFAULT 1,
  smtp_access INTEGER NOT NULL DEFAULT 1,
  active INTEGER NOT NULL DEFAULT 1
)""",
    """CREATE TABLE IF NOT EXISTS versions (
  application TEXT NOT NULL COLLATE NOCASE PRIMARY KEY,
  version TEXT NOT NULL
)""",
)
