//! Demo and test data: a small, realistic SQLite shop database, a background writer that keeps
//! changing it while a migration runs, and an independent table checksum to verify copies.
//!
//! - [`create_shop`] builds a fresh database file (WAL mode) with `customers`, `products`,
//!   `orders` and `order_lines` (a `WITHOUT ROWID` table), filled deterministically: the same
//!   `scale` always gives the same rows.
//! - [`ShopWriter`] runs one write transaction after another on its own thread (new orders,
//!   status changes, price changes, note edits, deletes with `ON DELETE CASCADE`, new
//!   customers) until [`ShopWriter::stop`].
//! - [`table_digest`] hashes every row of a table, value by value with its storage class, so
//!   two tables holding the same values with the same storage classes, in the same primary-key
//!   order, have the same digest.
//!
//! Note on storage classes: the money columns are declared `NUMERIC(p,2)`, so SQLite stores a
//! whole amount such as `12.0` as the INTEGER `12` and a fractional one such as `12.5` as a
//! REAL. The shop therefore deliberately holds both storage classes in those columns.
//!
//! Everything here is deterministic except the writer's timestamps (wall clock) and its
//! interleaving with other connections.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};

/// Rows per unit of `scale` in [`create_shop`].
const CUSTOMERS_PER_SCALE: u64 = 2_000;
const PRODUCTS_PER_SCALE: u64 = 500;
const ORDERS_PER_SCALE: u64 = 10_000;
/// Order lines per order are uniform in `1..=MAX_LINES_PER_ORDER` (mean 3).
const MAX_LINES_PER_ORDER: u64 = 5;

/// Seed of the generator behind [`create_shop`].
const SHOP_SEED: u64 = 0x6b75_616b_6173_686f;

/// 2019-01-01 00:00:00 UTC: the shop's history starts here.
const HISTORY_START: i64 = 1_546_300_800;
/// Six years of history (2019-01-01 .. 2024-12-31).
const HISTORY_SECONDS: i64 = 6 * 365 * 86_400;

/// Pause between two writer transactions.
const WRITER_PAUSE: Duration = Duration::from_millis(2);
/// Pause before retrying a writer transaction that met `SQLITE_BUSY`.
const WRITER_BUSY_PAUSE: Duration = Duration::from_millis(5);

const SCHEMA: &str = "
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    country TEXT,
    created_at TEXT NOT NULL,
    vip INTEGER NOT NULL DEFAULT 0,
    notes TEXT
);
CREATE TABLE products (
    id INTEGER PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    price NUMERIC(10,2) NOT NULL,
    weight_kg REAL,
    thumbnail BLOB,
    description TEXT
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    status TEXT NOT NULL CHECK (status IN ('new','paid','shipped','cancelled')),
    total NUMERIC(12,2) NOT NULL,
    placed_at TEXT NOT NULL,
    shipped_at TEXT
);
CREATE TABLE order_lines (
    order_id INTEGER NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    line_no INTEGER NOT NULL,
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL,
    unit_price NUMERIC(10,2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
) WITHOUT ROWID;
";

/// Created after the bulk load (faster than maintaining it row by row).
const INDEXES: &str = "CREATE INDEX orders_customer_id ON orders(customer_id);";

const FIRST_NAMES: &[&str] = &[
    "Anna",
    "Ben",
    "Chloé",
    "David",
    "Elif",
    "François",
    "Grace",
    "Hiro",
    "Ingrid",
    "José",
    "Kofi",
    "Lena",
    "Mateo",
    "Nina",
    "Oliver",
    "Priya",
    "Quentin",
    "Rosa",
    "Søren",
    "Tomás",
    "Uma",
    "Victor",
    "Wei",
    "Xenia",
    "Yusuf",
    "Zoë",
    "美咲",
    "Łukasz",
];
const LAST_NAMES: &[&str] = &[
    "Andersen", "Baker", "Castillo", "Dubois", "Eriksson", "Fischer", "García", "Hoffmann",
    "Ivanova", "Jensen", "Kowalski", "López", "Müller", "Nakamura", "O'Brien", "Petrov", "Quinn",
    "Rossi", "Schmidt", "Tanaka", "Ueda", "Van Dijk", "Wang", "Yılmaz", "Zhang",
];
/// ASCII-only stand-ins for [`FIRST_NAMES`], used in e-mail addresses (same length).
const EMAIL_NAMES: &[&str] = &[
    "anna", "ben", "chloe", "david", "elif", "francois", "grace", "hiro", "ingrid", "jose", "kofi",
    "lena", "mateo", "nina", "oliver", "priya", "quentin", "rosa", "soren", "tomas", "uma",
    "victor", "wei", "xenia", "yusuf", "zoe", "misaki", "lukasz",
];
const EMAIL_DOMAINS: &[&str] = &["example.com", "example.org", "example.net", "mail.test"];
const COUNTRIES: &[&str] = &[
    "DE", "FR", "NL", "US", "GB", "ES", "IT", "JP", "BR", "PL", "SE", "TR", "IN", "CN",
];
const CUSTOMER_NOTES: &[&str] = &[
    "prefers e-mail contact",
    "called about a late delivery",
    "wholesale inquiry; follow up in Q3",
    "Lieferung bitte an die Nachbarin (Müller) übergeben",
    "très bon client, toujours ponctuel",
    "配達は午前中希望",
    "loves the blue ones 💙",
    "gift wrap every order 🎁🎉",
    "",
];
const ADJECTIVES: &[&str] = &[
    "Classic",
    "Compact",
    "Deluxe",
    "Eco",
    "Handmade",
    "Heavy-duty",
    "Mini",
    "Organic",
    "Portable",
    "Premium",
    "Rustic",
    "Smart",
    "Vintage",
    "Wireless",
];
const NOUNS: &[&str] = &[
    "Backpack",
    "Blender",
    "Candle",
    "Chair",
    "Desk Lamp",
    "Headphones",
    "Kettle",
    "Mug",
    "Notebook",
    "Plant Pot",
    "Scarf",
    "Teapot",
    "Toolbox",
    "Umbrella",
    "Watch",
];
const DESCRIPTIONS: &[&str] = &[
    "Sturdy and simple. Does exactly what it says.",
    "Handmade in Montréal with a crème-brûlée finish.",
    "Größe: M · Farbe: Grün · Material: 100 % Baumwolle",
    "日本製の高品質な商品です。",
    "北欧风格设计，简约耐用。",
    "Perfect gift 🎁 for coffee lovers ☕",
    "Ça marche très bien, même à −20 °C ❄️",
    "Edición limitada — ¡sólo 500 unidades!",
    "Dishwasher safe. Not microwave safe.",
    "Includes a 2-year warranty 👍",
];

/// How many rows [`create_shop`] wrote into each table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShopCounts {
    pub customers: u64,
    pub products: u64,
    pub orders: u64,
    pub order_lines: u64,
}

/// Creates a fresh shop database at `path`, replacing any database file there (and its `-wal`,
/// `-shm` and `-journal` companions).
///
/// The database is in WAL journal mode. At `scale` 1 it holds 2,000 customers, 500 products,
/// 10,000 orders and about 30,000 order lines; every count multiplies by `scale`. The content
/// is deterministic: the same `scale` always gives the same rows. All rows are inserted in one
/// transaction with prepared statements.
pub fn create_shop(path: &Path, scale: u32) -> rusqlite::Result<ShopCounts> {
    remove_database_files(path).map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("removing old database {}: {e}", path.display())),
        )
    })?;

    let mut conn = Connection::open(path)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!("could not switch to WAL journal mode (got {mode})")),
        ));
    }
    conn.execute_batch(SCHEMA)?;

    let scale = u64::from(scale);
    let mut rng = Rng::new(SHOP_SEED);
    let mut counts = ShopCounts::default();

    let tx = conn.transaction()?;
    let customer_created = insert_customers(&tx, &mut rng, CUSTOMERS_PER_SCALE * scale)?;
    counts.customers = customer_created.len() as u64;
    let product_cents = insert_products(&tx, &mut rng, PRODUCTS_PER_SCALE * scale)?;
    counts.products = product_cents.len() as u64;
    let (orders, lines) = insert_orders(
        &tx,
        &mut rng,
        ORDERS_PER_SCALE * scale,
        &customer_created,
        &product_cents,
    )?;
    counts.orders = orders;
    counts.order_lines = lines;
    tx.execute_batch(INDEXES)?;
    tx.commit()?;

    conn.execute_batch("PRAGMA optimize;")?;
    Ok(counts)
}

/// Removes `path` and its SQLite companion files; a file that does not exist is fine.
fn remove_database_files(path: &Path) -> io::Result<()> {
    let mut paths = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut p = OsString::from(path.as_os_str());
        p.push(suffix);
        paths.push(PathBuf::from(p));
    }
    for p in paths {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Inserts `n` customers with ids `1..=n`; returns each one's `created_at` in Unix seconds
/// (index `id - 1`).
fn insert_customers(conn: &Connection, rng: &mut Rng, n: u64) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare(
        "INSERT INTO customers (id, email, name, country, created_at, vip, notes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut created = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for id in 1..=n as i64 {
        let customer = random_customer(rng, id);
        // Customers join during the first five of the six years.
        let at = HISTORY_START + rng.below_i64(HISTORY_SECONDS * 5 / 6);
        stmt.execute(params![
            id,
            customer.email,
            customer.name,
            customer.country,
            timestamp(at, rng.below(1_000_000) as u32),
            customer.vip,
            customer.notes,
        ])?;
        created.push(at);
    }
    Ok(created)
}

/// A customer's generated columns (everything but `id` and `created_at`).
struct Customer {
    email: String,
    name: String,
    country: Option<&'static str>,
    vip: bool,
    notes: Option<&'static str>,
}

/// A random customer; `id` makes the e-mail address unique.
fn random_customer(rng: &mut Rng, id: i64) -> Customer {
    let first = rng.index(FIRST_NAMES.len());
    let last = *rng.pick(LAST_NAMES);
    let domain = *rng.pick(EMAIL_DOMAINS);
    let email_last: String = last
        .chars()
        .filter(char::is_ascii_alphabetic)
        .collect::<String>()
        .to_ascii_lowercase();
    Customer {
        email: format!("{}.{email_last}{id}@{domain}", EMAIL_NAMES[first]),
        name: format!("{} {last}", FIRST_NAMES[first]),
        country: (!rng.chance(8)).then(|| *rng.pick(COUNTRIES)),
        vip: rng.chance(5),
        notes: rng.chance(20).then(|| *rng.pick(CUSTOMER_NOTES)),
    }
}

/// Inserts `n` products with ids `1..=n`; returns each one's price in cents (index `id - 1`).
fn insert_products(conn: &Connection, rng: &mut Rng, n: u64) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare(
        "INSERT INTO products (id, sku, title, price, weight_kg, thumbnail, description)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut prices = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for id in 1..=n as i64 {
        let title = format!("{} {}", rng.pick(ADJECTIVES), rng.pick(NOUNS));
        // Mostly x.99 / x.49 / x.00 prices, some arbitrary cents.
        let euros = 1 + rng.below_i64(300);
        let cents = euros * 100
            + match rng.below(4) {
                0 => 0,
                1 => 49,
                2 => 99,
                _ => rng.below_i64(100),
            }
            - 100;
        let cents = cents.max(50);
        let weight = (!rng.chance(10)).then(|| round_to(0.05 + rng.unit() * 20.0, 3));
        let thumbnail = (!rng.chance(20)).then(|| {
            let len = 32 + rng.index(225);
            rng.bytes(len)
        });
        let description = (!rng.chance(10)).then(|| {
            let text = *rng.pick(DESCRIPTIONS);
            if rng.chance(30) {
                format!("{text}\n{}", rng.pick(DESCRIPTIONS))
            } else {
                text.to_string()
            }
        });
        stmt.execute(params![
            id,
            format!("SKU-{id:06}"),
            title,
            cents_to_real(cents),
            weight,
            thumbnail,
            description,
        ])?;
        prices.push(cents);
    }
    Ok(prices)
}

/// Inserts `n` orders with ids `1..=n` and their lines; returns `(orders, lines)` written.
fn insert_orders(
    conn: &Connection,
    rng: &mut Rng,
    n: u64,
    customer_created: &[i64],
    product_cents: &[i64],
) -> rusqlite::Result<(u64, u64)> {
    if customer_created.is_empty() || product_cents.is_empty() {
        return Ok((0, 0));
    }
    let mut order_stmt = conn.prepare(
        "INSERT INTO orders (id, customer_id, status, total, placed_at, shipped_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut line_stmt = conn.prepare(
        "INSERT INTO order_lines (order_id, line_no, product_id, quantity, unit_price)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let history_end = HISTORY_START + HISTORY_SECONDS;
    let mut lines_written = 0;
    for id in 1..=n as i64 {
        let customer = rng.index(customer_created.len());
        let joined = customer_created[customer];
        let placed = joined + rng.below_i64((history_end - joined).max(1));

        let line_count = 1 + rng.below(MAX_LINES_PER_ORDER);
        let mut total_cents = 0;
        let mut lines = Vec::with_capacity(line_count as usize);
        for line_no in 1..=line_count as i64 {
            let product = rng.index(product_cents.len());
            let quantity = if rng.chance(70) {
                1
            } else {
                2 + rng.below_i64(5)
            };
            // Some lines were sold at a 10 % discount.
            let mut unit = product_cents[product];
            if rng.chance(10) {
                unit = unit * 9 / 10;
            }
            total_cents += unit * quantity;
            lines.push((line_no, product as i64 + 1, quantity, unit));
        }

        let (status, shipped_at) = match rng.below(100) {
            0..10 => ("new", None),
            10..25 => ("paid", None),
            25..90 => {
                let shipped = placed + 3_600 + rng.below_i64(5 * 86_400);
                (
                    "shipped",
                    Some(timestamp(shipped, rng.below(1_000_000) as u32)),
                )
            }
            _ => ("cancelled", None),
        };
        order_stmt.execute(params![
            id,
            customer as i64 + 1,
            status,
            cents_to_real(total_cents),
            timestamp(placed, rng.below(1_000_000) as u32),
            shipped_at,
        ])?;
        for (line_no, product_id, quantity, unit) in lines {
            line_stmt.execute(params![
                id,
                line_no,
                product_id,
                quantity,
                cents_to_real(unit)
            ])?;
            lines_written += 1;
        }
    }
    Ok((n, lines_written))
}

/// What a [`ShopWriter`] did, returned by [`ShopWriter::stop`].
#[derive(Debug, Clone, Default)]
pub struct WriterStats {
    /// Committed transactions.
    pub transactions: u64,
    /// Rows inserted (orders, order lines, customers).
    pub inserts: u64,
    /// Rows updated (order status, product price, customer notes).
    pub updates: u64,
    /// Rows deleted, counting the order lines removed by `ON DELETE CASCADE`.
    pub deletes: u64,
    /// The error that stopped the writer early, if any (`SQLITE_BUSY` is retried, not an
    /// error).
    pub error: Option<String>,
    /// Transactions committed on the second database of [`ShopWriter::start_pair`].
    pub on_second: u64,
    /// Times the writer was refused by a fenced database and moved to the other one.
    pub moves: u64,
}

/// A background thread that keeps changing a shop made by [`create_shop`]: one small write
/// transaction every ~2 ms until [`stop`](ShopWriter::stop).
///
/// Each transaction is one of: place a new order with 1-4 lines, advance an order's status
/// (`new` → `paid` → `shipped`, or `cancelled`), change a product's price, edit a customer's
/// notes, delete a cancelled order (its lines go by `ON DELETE CASCADE`), add a customer.
/// Transactions start with `BEGIN IMMEDIATE`; one that fails with `SQLITE_BUSY` or
/// `SQLITE_LOCKED` is retried, any other error stops the writer and is reported in
/// [`WriterStats::error`].
///
/// Dropping a `ShopWriter` without calling `stop` also stops and joins the thread.
pub struct ShopWriter {
    stop: Arc<AtomicBool>,
    transactions: Arc<AtomicU64>,
    /// Where the application is told to write (0 or 1 of the pair).
    prefer: Arc<AtomicU64>,
    /// The running thread, or why it could not be started; `None` once joined.
    thread: Option<Result<JoinHandle<WriterStats>, String>>,
}

impl ShopWriter {
    /// Starts the writer on the existing database at `path`; `seed` picks its sequence of
    /// changes. An error opening the database (or starting the thread) is reported by
    /// [`stop`](ShopWriter::stop).
    pub fn start(path: &Path, seed: u64) -> ShopWriter {
        ShopWriter::start_pair([path.to_path_buf(), path.to_path_buf()], seed)
    }

    /// Like [`start`](ShopWriter::start), on the first of two copies of the shop, behaving
    /// like an application during a cutover: when its database refuses writes as read-only
    /// (kuaka's fence), it moves to the one [`prefer`](ShopWriter::prefer) names, or waits
    /// there until it is writable again.
    pub fn start_pair(paths: [PathBuf; 2], seed: u64) -> ShopWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let transactions = Arc::new(AtomicU64::new(0));
        let prefer = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let transactions = Arc::clone(&transactions);
            let prefer = Arc::clone(&prefer);
            thread::Builder::new()
                .name("kuaka-shop-writer".into())
                .spawn(move || run_writer(&paths, seed, &stop, &transactions, &prefer))
                .map_err(|e| format!("starting the writer thread: {e}"))
        };
        ShopWriter {
            stop,
            transactions,
            prefer,
            thread: Some(thread),
        }
    }

    /// Tell the writer which database of the pair to write to once its current one refuses.
    pub fn prefer(&self, index: u64) {
        self.prefer.store(index.min(1), Ordering::Relaxed);
    }

    /// Transactions committed so far.
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Stops the writer after its current transaction, waits for the thread and returns what it
    /// did.
    pub fn stop(mut self) -> WriterStats {
        self.join()
    }

    fn join(&mut self) -> WriterStats {
        self.stop.store(true, Ordering::Relaxed);
        let counter = Arc::clone(&self.transactions);
        let failed = |error: String| WriterStats {
            transactions: counter.load(Ordering::Relaxed),
            error: Some(error),
            ..WriterStats::default()
        };
        match self.thread.take() {
            Some(Ok(handle)) => handle
                .join()
                .unwrap_or_else(|_| failed("the writer thread panicked".into())),
            Some(Err(error)) => failed(error),
            None => WriterStats::default(),
        }
    }
}

impl Drop for ShopWriter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.join();
        }
    }
}

/// Row counts changed by one writer transaction.
#[derive(Default)]
struct Changed {
    inserts: u64,
    updates: u64,
    deletes: u64,
}

/// The writer thread's body.
fn run_writer(
    paths: &[PathBuf; 2],
    seed: u64,
    stop: &AtomicBool,
    transactions: &AtomicU64,
    prefer: &AtomicU64,
) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut current = 0usize;
    let mut conn = match open_writer(&paths[current]) {
        Ok(conn) => conn,
        Err(e) => {
            stats.error = Some(format!("opening {}: {e}", paths[current].display()));
            return stats;
        }
    };
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let choice = rng.below(100);
        // Retry the same kind of change until it commits, is stopped, or fails for good.
        loop {
            match writer_transaction(&mut conn, &mut rng, choice) {
                Ok(changed) => {
                    stats.transactions += 1;
                    stats.inserts += changed.inserts;
                    stats.updates += changed.updates;
                    stats.deletes += changed.deletes;
                    if current == 1 {
                        stats.on_second += 1;
                    }
                    transactions.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if is_busy(&e) || is_fenced(&e) => {
                    if stop.load(Ordering::Relaxed) {
                        return stats;
                    }
                    let want = prefer.load(Ordering::Relaxed) as usize;
                    if is_fenced(&e) && want != current {
                        match open_writer(&paths[want]) {
                            Ok(c) => {
                                conn = c;
                                current = want;
                                stats.moves += 1;
                                continue;
                            }
                            Err(e) => {
                                stats.error =
                                    Some(format!("opening {}: {e}", paths[want].display()));
                                return stats;
                            }
                        }
                    }
                    thread::sleep(WRITER_BUSY_PAUSE);
                }
                Err(e) => {
                    stats.error = Some(e.to_string());
                    return stats;
                }
            }
        }
        thread::sleep(WRITER_PAUSE);
    }
    stats
}

fn open_writer(path: &Path) -> rusqlite::Result<Connection> {
    // No SQLITE_OPEN_CREATE: the shop must already exist.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

/// Whether `e` is kuaka's fence refusing the write (the database is cut over).
fn is_fenced(e: &rusqlite::Error) -> bool {
    e.to_string().contains("read-only (cutover)")
}

/// Whether `e` is a lock conflict worth retrying.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Runs one writer transaction of the kind picked by `choice` (0..100).
fn writer_transaction(
    conn: &mut Connection,
    rng: &mut Rng,
    choice: u64,
) -> rusqlite::Result<Changed> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let changed = match choice {
        0..30 => place_order(&tx, rng)?,
        30..55 => advance_order(&tx, rng)?,
        55..65 => change_price(&tx, rng)?,
        65..80 => edit_notes(&tx, rng)?,
        80..90 => delete_cancelled_order(&tx, rng)?,
        _ => add_customer(&tx, rng)?,
    };
    tx.commit()?;
    Ok(changed)
}

/// `max(id)` of a table (0 when empty).
fn max_id(conn: &Connection, table: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached(&format!("SELECT coalesce(max(id), 0) FROM {table}"))?
        .query_row([], |r| r.get(0))
}

/// A new order with 1-4 lines at the products' current prices.
fn place_order(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<Changed> {
    let customers = max_id(conn, "customers")?;
    let products = max_id(conn, "products")?;
    if customers == 0 || products == 0 {
        return Ok(Changed::default());
    }
    let order_id = max_id(conn, "orders")? + 1;
    let customer_id = 1 + rng.below_i64(customers);
    let mut price_stmt = conn.prepare_cached("SELECT price FROM products WHERE id = ?1")?;
    let mut lines = Vec::new();
    let mut total_cents = 0;
    for line_no in 1..=1 + rng.below_i64(4) {
        let product_id = 1 + rng.below_i64(products);
        let Some(price) = price_stmt
            .query_row([product_id], |r| r.get::<_, f64>(0))
            .optional()?
        else {
            continue;
        };
        let unit = (price * 100.0).round() as i64;
        let quantity = if rng.chance(75) {
            1
        } else {
            2 + rng.below_i64(3)
        };
        total_cents += unit * quantity;
        lines.push((line_no, product_id, quantity, unit));
    }
    conn.prepare_cached(
        "INSERT INTO orders (id, customer_id, status, total, placed_at, shipped_at)
         VALUES (?1, ?2, 'new', ?3, ?4, NULL)",
    )?
    .execute(params![
        order_id,
        customer_id,
        cents_to_real(total_cents),
        now_timestamp()
    ])?;
    let mut line_stmt = conn.prepare_cached(
        "INSERT INTO order_lines (order_id, line_no, product_id, quantity, unit_price)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (line_no, product_id, quantity, unit) in &lines {
        line_stmt.execute(params![
            order_id,
            line_no,
            product_id,
            quantity,
            cents_to_real(*unit)
        ])?;
    }
    Ok(Changed {
        inserts: 1 + lines.len() as u64,
        ..Changed::default()
    })
}

/// Moves an open order (`new` or `paid`) on: mostly to the next status, sometimes to
/// `cancelled`. Searches upward from a random id, wrapping around once.
fn advance_order(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<Changed> {
    let start = 1 + rng.below_i64(max_id(conn, "orders")?.max(1));
    let mut find = conn.prepare_cached(
        "SELECT id, status FROM orders WHERE id >= ?1 AND status IN ('new', 'paid')
         ORDER BY id LIMIT 1",
    )?;
    let found = match find
        .query_row([start], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?
    {
        Some(found) => Some(found),
        None => find
            .query_row([1], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .optional()?,
    };
    let Some((id, status)) = found else {
        return Ok(Changed::default());
    };
    let updated = if rng.chance(15) {
        conn.prepare_cached("UPDATE orders SET status = 'cancelled' WHERE id = ?1")?
            .execute([id])?
    } else if status == "new" {
        conn.prepare_cached("UPDATE orders SET status = 'paid' WHERE id = ?1")?
            .execute([id])?
    } else {
        conn.prepare_cached("UPDATE orders SET status = 'shipped', shipped_at = ?2 WHERE id = ?1")?
            .execute(params![id, now_timestamp()])?
    };
    Ok(Changed {
        updates: updated as u64,
        ..Changed::default()
    })
}

/// Changes a random product's price by -10 % .. +10 %, rounded to cents.
fn change_price(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<Changed> {
    let products = max_id(conn, "products")?;
    if products == 0 {
        return Ok(Changed::default());
    }
    let id = 1 + rng.below_i64(products);
    let Some(price) = conn
        .prepare_cached("SELECT price FROM products WHERE id = ?1")?
        .query_row([id], |r| r.get::<_, f64>(0))
        .optional()?
    else {
        return Ok(Changed::default());
    };
    let cents = ((price * 100.0).round() * (0.9 + rng.unit() * 0.2)).round() as i64;
    let updated = conn
        .prepare_cached("UPDATE products SET price = ?2 WHERE id = ?1")?
        .execute(params![id, cents_to_real(cents.max(50))])?;
    Ok(Changed {
        updates: updated as u64,
        ..Changed::default()
    })
}

/// Sets a random customer's notes: to NULL, to a stock note, or to a fresh one with emoji.
fn edit_notes(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<Changed> {
    let customers = max_id(conn, "customers")?;
    if customers == 0 {
        return Ok(Changed::default());
    }
    let id = 1 + rng.below_i64(customers);
    let notes = match rng.below(3) {
        0 => None,
        1 => Some(rng.pick(CUSTOMER_NOTES).to_string()),
        _ => Some(format!(
            "{} {} (#{})",
            rng.pick(&["called back", "asked for a refund", "left a review"]),
            rng.pick(&["🙂", "⭐⭐⭐⭐⭐", "📦🚚", "🇩🇪", "👍🏽"]),
            rng.below(10_000)
        )),
    };
    let updated = conn
        .prepare_cached("UPDATE customers SET notes = ?2 WHERE id = ?1")?
        .execute(params![id, notes])?;
    Ok(Changed {
        updates: updated as u64,
        ..Changed::default()
    })
}

/// Deletes a cancelled order (searching upward from a random id, wrapping around once); its
/// lines go with it by `ON DELETE CASCADE`.
fn delete_cancelled_order(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<Changed> {
    let start = 1 + rng.below_i64(max_id(conn, "orders")?.max(1));
    let mut find = conn.prepare_cached(
        "SELECT id FROM orders WHERE id >= ?1 AND status = 'cancelled' ORDER BY id LIMIT 1",
    )?;
    let found = match find.query_row([start], |r| r.get::<_, i64>(0)).optional()? {
        Some(id) => Some(id),
        None => find.query_row([1], |r| r.get::<_, i64>(0)).optional()?,
    };
    let Some(id) = found else {
        return Ok(Changed::default());
    };
    let lines: i64 = conn
        .prepare_cached("SELECT count(*) FROM order_lines WHERE order_id = ?1")?
        .query_row([id], |r| r.get(0))?;
    let deleted = conn
        .prepare_cached("DELETE FROM orders WHERE id = ?1")?
        .execute([id])?;
    Ok(Changed {
        deletes: deleted as u64 + if deleted > 0 { lines as u64 } else { 0 },
        ..Changed::default()
    })
}

/// Inserts a new customer with id `max(id) + 1`, joined now.
fn add_customer(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<Changed> {
    let id = max_id(conn, "customers")? + 1;
    let customer = random_customer(rng, id);
    conn.prepare_cached(
        "INSERT INTO customers (id, email, name, country, created_at, vip, notes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id,
        customer.email,
        customer.name,
        customer.country,
        now_timestamp(),
        customer.vip,
        customer.notes,
    ])?;
    Ok(Changed {
        inserts: 1,
        ..Changed::default()
    })
}

/// An independent checksum of `table`: its row count and a 128-bit FNV-1a digest (32 hex
/// digits) of all its rows.
///
/// Rows are read with `SELECT * ... ORDER BY` the primary-key columns in key order (a table
/// without a declared primary key is ordered by all its columns, so that the digest does not
/// depend on rowids). Each row feeds its column count, then each value as a storage-class tag
/// (NULL, INTEGER, REAL as the bits of the `f64`, TEXT bytes, BLOB bytes) followed by its
/// length-prefixed bytes. The same values with the same storage classes in the same order give
/// the same digest; a changed value or storage class changes it.
pub fn table_digest(conn: &Connection, table: &str) -> rusqlite::Result<(u64, String)> {
    let mut columns: Vec<(String, i64)> = conn
        .prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut order: Vec<String> = Vec::new();
    if columns.iter().any(|(_, pk)| *pk > 0) {
        columns.retain(|(_, pk)| *pk > 0);
        columns.sort_by_key(|(_, pk)| *pk);
    }
    for (name, _) in &columns {
        order.push(quote_ident(name));
    }
    let mut sql = format!("SELECT * FROM {}", quote_ident(table));
    if !order.is_empty() {
        sql.push_str(" ORDER BY ");
        sql.push_str(&order.join(", "));
    }

    let mut stmt = conn.prepare(&sql)?;
    let width = stmt.column_count();
    let mut hash = Fnv128::new();
    let mut count = 0u64;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        count += 1;
        hash.write(b"R");
        hash.write(&(width as u64).to_le_bytes());
        for i in 0..width {
            match row.get_ref(i)? {
                ValueRef::Null => hash.tagged(0, &[]),
                ValueRef::Integer(v) => hash.tagged(1, &v.to_le_bytes()),
                ValueRef::Real(v) => hash.tagged(2, &v.to_bits().to_le_bytes()),
                ValueRef::Text(t) => hash.tagged(3, t),
                ValueRef::Blob(b) => hash.tagged(4, b),
            }
        }
    }
    Ok((count, format!("{:032x}", hash.finish())))
}

/// `name` as a double-quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// 128-bit FNV-1a.
struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    fn new() -> Fnv128 {
        Fnv128(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u128::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// A storage-class tag, the length of `bytes` (u64 little-endian), then `bytes`.
    fn tagged(&mut self, tag: u8, bytes: &[u8]) {
        self.write(&[tag]);
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    fn finish(&self) -> u128 {
        self.0
    }
}

/// A small deterministic PRNG: xorshift64* seeded through splitmix64 (never zero).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 step: spreads similar seeds apart and avoids the all-zero state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0); the modulo bias is irrelevant here.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `0..n` for a positive `n` (0 otherwise).
    fn below_i64(&mut self, n: i64) -> i64 {
        self.below(n.max(0) as u64) as i64
    }

    /// Uniform index into a collection of `len` items.
    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// An amount in cents as a REAL rounded to two places (NUMERIC affinity stores whole amounts
/// as INTEGER).
fn cents_to_real(cents: i64) -> f64 {
    cents as f64 / 100.0
}

fn round_to(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// Unix seconds plus microseconds as `YYYY-MM-DD HH:MM:SS.ffffff` (UTC).
fn timestamp(unix_seconds: i64, micros: u32) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        micros % 1_000_000
    )
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS.ffffff`.
fn now_timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    timestamp(now.as_secs() as i64, now.subsec_micros())
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLES: [&str; 4] = ["customers", "products", "orders", "order_lines"];

    fn count(conn: &Connection, table: &str) -> u64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
    }

    /// `PRAGMA foreign_key_check` violations.
    fn fk_violations(conn: &Connection) -> usize {
        let mut stmt = conn.prepare("PRAGMA foreign_key_check").unwrap();
        stmt.query_map([], |_| Ok(())).unwrap().count()
    }

    #[test]
    fn timestamps_are_iso_8601() {
        assert_eq!(timestamp(0, 0), "1970-01-01 00:00:00.000000");
        assert_eq!(timestamp(HISTORY_START, 42), "2019-01-01 00:00:00.000042");
        assert_eq!(
            timestamp(951_825_599, 999_999),
            "2000-02-29 11:59:59.999999"
        );
        assert_eq!(timestamp(1_735_689_599, 5), "2024-12-31 23:59:59.000005");
    }

    #[test]
    fn create_shop_scale_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.db");
        // A stale file is replaced.
        fs::write(&path, b"not a database").unwrap();
        let counts = create_shop(&path, 1).unwrap();
        assert_eq!(counts.customers, 2_000);
        assert_eq!(counts.products, 500);
        assert_eq!(counts.orders, 10_000);
        assert!((27_000..33_000).contains(&counts.order_lines), "{counts:?}");

        let conn = Connection::open(&path).unwrap();
        assert_eq!(count(&conn, "customers"), counts.customers);
        assert_eq!(count(&conn, "products"), counts.products);
        assert_eq!(count(&conn, "orders"), counts.orders);
        assert_eq!(count(&conn, "order_lines"), counts.order_lines);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(fk_violations(&conn), 0);
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");

        // The data has the promised shape.
        let (shipped_without_date, unshipped_with_date): (i64, i64) = conn
            .query_row(
                "SELECT sum(status = 'shipped' AND shipped_at IS NULL),
                        sum(status <> 'shipped' AND shipped_at IS NOT NULL) FROM orders",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((shipped_without_date, unshipped_with_date), (0, 0));
        let (null_thumbs, min_len, max_len, non_ascii): (i64, i64, i64, i64) = conn
            .query_row(
                "SELECT sum(thumbnail IS NULL), min(length(thumbnail)), max(length(thumbnail)),
                        sum(length(CAST(description AS BLOB)) > length(description))
                 FROM products",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert!(null_thumbs > 0 && min_len >= 32 && max_len <= 256 && non_ascii > 0);
        let null_notes: i64 = conn
            .query_row(
                "SELECT count(*) FROM customers WHERE notes IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(null_notes > 1_000);
        // Totals match their lines to the cent.
        let mismatched: i64 = conn
            .query_row(
                "SELECT count(*) FROM orders o
                 WHERE abs(o.total - (SELECT sum(quantity * unit_price) FROM order_lines
                                      WHERE order_id = o.id)) > 0.005",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(mismatched, 0);

        // Deterministic: a second shop has the same digests.
        let path2 = dir.path().join("shop2.db");
        create_shop(&path2, 1).unwrap();
        let conn2 = Connection::open(&path2).unwrap();
        for table in TABLES {
            assert_eq!(
                table_digest(&conn, table).unwrap(),
                table_digest(&conn2, table).unwrap()
            );
        }
    }

    #[test]
    fn writer_keeps_the_shop_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.db");
        let counts = create_shop(&path, 1).unwrap();

        // A reader holding a transaction open does not stop the writer (WAL).
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        assert_eq!(count(&reader, "orders"), counts.orders);

        let writer = ShopWriter::start(&path, 7);
        thread::sleep(Duration::from_millis(300));
        let live = writer.transactions();
        let stats = writer.stop();
        assert_eq!(stats.error, None, "{stats:?}");
        assert!(stats.transactions > 10, "{stats:?}");
        assert!(stats.transactions >= live);
        assert!(stats.inserts + stats.updates > 0, "{stats:?}");

        // The reader's snapshot is unchanged; a new one sees the changes.
        assert_eq!(count(&reader, "orders"), counts.orders);
        reader.execute_batch("COMMIT").unwrap();

        let conn = Connection::open(&path).unwrap();
        assert_eq!(fk_violations(&conn), 0);
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
        let orphans: i64 = conn
            .query_row(
                "SELECT count(*) FROM order_lines WHERE order_id NOT IN (SELECT id FROM orders)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0);
    }

    #[test]
    fn writer_reports_a_missing_database() {
        let dir = tempfile::tempdir().unwrap();
        let stats = ShopWriter::start(&dir.path().join("missing.db"), 1).stop();
        assert!(stats.error.is_some(), "{stats:?}");
        assert_eq!(stats.transactions, 0);
    }

    #[test]
    fn digest_of_a_copy_matches_until_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shop.db");
        let copy = dir.path().join("copy.db");
        let counts = create_shop(&path, 1).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
            .unwrap();
        let copy_conn = Connection::open(&copy).unwrap();

        for table in TABLES {
            let original = table_digest(&conn, table).unwrap();
            assert_eq!(
                original,
                table_digest(&copy_conn, table).unwrap(),
                "{table}"
            );
            assert_eq!(original.1.len(), 32);
        }
        assert_eq!(table_digest(&conn, "orders").unwrap().0, counts.orders);
        let different: std::collections::HashSet<String> = TABLES
            .iter()
            .map(|t| table_digest(&conn, t).unwrap().1)
            .collect();
        assert_eq!(different.len(), TABLES.len());

        let before = table_digest(&copy_conn, "order_lines").unwrap();
        copy_conn
            .execute(
                "UPDATE order_lines SET quantity = quantity + 1 WHERE order_id = 5000 AND line_no = 1",
                [],
            )
            .unwrap();
        let after = table_digest(&copy_conn, "order_lines").unwrap();
        assert_eq!(before.0, after.0);
        assert_ne!(before.1, after.1);
        // Putting the value back restores the digest.
        copy_conn
            .execute(
                "UPDATE order_lines SET quantity = quantity - 1 WHERE order_id = 5000 AND line_no = 1",
                [],
            )
            .unwrap();
        assert_eq!(table_digest(&copy_conn, "order_lines").unwrap(), before);

        // A NULL becoming an empty string is a change too.
        let before = table_digest(&copy_conn, "customers").unwrap();
        copy_conn
            .execute(
                "UPDATE customers SET notes = '' WHERE id = (SELECT min(id) FROM customers WHERE notes IS NULL)",
                [],
            )
            .unwrap();
        assert_ne!(table_digest(&copy_conn, "customers").unwrap(), before);

        assert!(table_digest(&conn, "no_such_table").is_err());
    }

    #[test]
    fn digest_sees_storage_classes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE i (v);   INSERT INTO i VALUES (1);
             CREATE TABLE t (v);   INSERT INTO t VALUES ('1');
             CREATE TABLE r (v);   INSERT INTO r VALUES (1.0);
             CREATE TABLE b (v);   INSERT INTO b VALUES (x'31');
             CREATE TABLE n (v);   INSERT INTO n VALUES (NULL);
             CREATE TABLE e (v);   INSERT INTO e VALUES ('');
             CREATE TABLE i2 (\"we\"\"ird\" INTEGER PRIMARY KEY, v); INSERT INTO i2 VALUES (1, NULL);
             CREATE TABLE two (a, b);  INSERT INTO two VALUES ('ab', 'c');
             CREATE TABLE two2 (a, b); INSERT INTO two2 VALUES ('a', 'bc');",
        )
        .unwrap();
        let digests: Vec<(u64, String)> = ["i", "t", "r", "b", "n", "e"]
            .iter()
            .map(|t| table_digest(&conn, t).unwrap())
            .collect();
        for (i, a) in digests.iter().enumerate() {
            assert_eq!(a.0, 1);
            for b in &digests[i + 1..] {
                assert_ne!(a.1, b.1);
            }
        }
        // Length prefixes keep value boundaries apart.
        assert_ne!(
            table_digest(&conn, "two").unwrap(),
            table_digest(&conn, "two2").unwrap()
        );
        // Quoted identifiers work; a row (1, NULL) differs from a single 1.
        assert_ne!(table_digest(&conn, "i2").unwrap(), digests[0]);

        // Row order follows the key, not the insertion order.
        conn.execute_batch(
            "CREATE TABLE k1 (id INTEGER PRIMARY KEY, v); INSERT INTO k1 VALUES (1, 'a'), (2, 'b');
             CREATE TABLE k2 (id INTEGER PRIMARY KEY, v); INSERT INTO k2 VALUES (2, 'b'), (1, 'a');
             CREATE TABLE u1 (v); INSERT INTO u1 VALUES ('x'), ('y');
             CREATE TABLE u2 (v); INSERT INTO u2 VALUES ('y'), ('x');",
        )
        .unwrap();
        assert_eq!(
            table_digest(&conn, "k1").unwrap(),
            table_digest(&conn, "k2").unwrap()
        );
        assert_eq!(
            table_digest(&conn, "u1").unwrap(),
            table_digest(&conn, "u2").unwrap()
        );
    }
}
