;; The sector modes' own work around the block cipher (drivers/crypto/modes.ts), as
;; WebAssembly: what OpenSSL cannot do for us when every sector has its own IV or tweak.
;; Assembled into modes-wasm.ts (test/modes-wasm.test.ts checks that the bytes there are
;; this file's).
;;
;; XTS (IEEE 1619):
;; prep(data, tw, ivs, count, per): for each of `count` sectors, its encrypted IV (16
;;   bytes at ivs) is the tweak of its first block; each of its `per` 16-byte blocks
;;   gets data ^= tweak, the tweak is kept at tw (for the XOR after the block cipher),
;;   and the next block's tweak is this one times x in GF(2^128) (a 128-bit
;;   little-endian shift left by one, 0x87 folded in for the bit that falls off).
;; xor(a, b, len): a ^= b over len bytes, len a multiple of 16.
;;
;; CBC decryption, after the block cipher decrypted every block (ECB):
;; cbcdec(plain, cipher, ivs, count, ss): for each of `count` sectors of `ss` bytes, its
;;   first block ^= its IV (16 bytes at ivs), every other block ^= the ciphertext block
;;   before it (at cipher, the sector's ciphertext).
;;
;; CBC encryption chains the blocks of a sector, but sectors are independent: block
;; position `off` of every sector goes through the block cipher at once, in a lane.
;; cbcgather(lane, data, ivs, count, ss, off): lane block s = block `off` of sector s
;;   ^ the block before it in that sector, already encrypted (its IV at ivs for off 0).
;; cbcscatter(data, lane, count, ss, off): block `off` of sector s = lane block s.
(module
  (memory (export "mem") 34)
  (func (export "prep") (param $data i32) (param $tw i32) (param $ivs i32) (param $count i32) (param $per i32)
    (local $s i32) (local $b i32) (local $lo i64) (local $hi i64) (local $c i64)
    (block $done
      (loop $sector
        (br_if $done (i32.ge_u (local.get $s) (local.get $count)))
        (local.set $lo (i64.load (local.get $ivs)))
        (local.set $hi (i64.load offset=8 (local.get $ivs)))
        (local.set $ivs (i32.add (local.get $ivs) (i32.const 16)))
        (local.set $b (i32.const 0))
        (block $blocksDone
          (loop $block
            (br_if $blocksDone (i32.ge_u (local.get $b) (local.get $per)))
            (i64.store (local.get $tw) (local.get $lo))
            (i64.store offset=8 (local.get $tw) (local.get $hi))
            (i64.store (local.get $data) (i64.xor (i64.load (local.get $data)) (local.get $lo)))
            (i64.store offset=8 (local.get $data) (i64.xor (i64.load offset=8 (local.get $data)) (local.get $hi)))
            (local.set $c (i64.shr_u (local.get $hi) (i64.const 63)))
            (local.set $hi (i64.or (i64.shl (local.get $hi) (i64.const 1)) (i64.shr_u (local.get $lo) (i64.const 63))))
            (local.set $lo (i64.xor (i64.shl (local.get $lo) (i64.const 1)) (i64.mul (local.get $c) (i64.const 0x87))))
            (local.set $tw (i32.add (local.get $tw) (i32.const 16)))
            (local.set $data (i32.add (local.get $data) (i32.const 16)))
            (local.set $b (i32.add (local.get $b) (i32.const 1)))
            (br $block)))
        (local.set $s (i32.add (local.get $s) (i32.const 1)))
        (br $sector))))
  (func (export "xor") (param $a i32) (param $b i32) (param $len i32)
    (local $end i32)
    (local.set $end (i32.add (local.get $a) (local.get $len)))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $a) (local.get $end)))
        (v128.store (local.get $a) (v128.xor (v128.load (local.get $a)) (v128.load (local.get $b))))
        (local.set $a (i32.add (local.get $a) (i32.const 16)))
        (local.set $b (i32.add (local.get $b) (i32.const 16)))
        (br $l))))
  (func (export "cbcdec") (param $plain i32) (param $cipher i32) (param $ivs i32) (param $count i32) (param $ss i32)
    (local $s i32) (local $p i32) (local $end i32)
    (block $done
      (loop $sector
        (br_if $done (i32.ge_u (local.get $s) (local.get $count)))
        (v128.store (local.get $plain) (v128.xor (v128.load (local.get $plain)) (v128.load (local.get $ivs))))
        (local.set $end (i32.add (local.get $plain) (local.get $ss)))
        (local.set $p (i32.add (local.get $plain) (i32.const 16)))
        (block $blocksDone
          (loop $block
            (br_if $blocksDone (i32.ge_u (local.get $p) (local.get $end)))
            (v128.store (local.get $p) (v128.xor (v128.load (local.get $p)) (v128.load (local.get $cipher))))
            (local.set $p (i32.add (local.get $p) (i32.const 16)))
            (local.set $cipher (i32.add (local.get $cipher) (i32.const 16)))
            (br $block)))
        ;; The last ciphertext block of a sector chains nothing: skip it.
        (local.set $cipher (i32.add (local.get $cipher) (i32.const 16)))
        (local.set $plain (local.get $end))
        (local.set $ivs (i32.add (local.get $ivs) (i32.const 16)))
        (local.set $s (i32.add (local.get $s) (i32.const 1)))
        (br $sector))))
  (func (export "cbcgather") (param $lane i32) (param $data i32) (param $ivs i32) (param $count i32) (param $ss i32) (param $off i32)
    (local $s i32) (local $p i32)
    (local.set $p (i32.add (local.get $data) (local.get $off)))
    (block $done
      (loop $sector
        (br_if $done (i32.ge_u (local.get $s) (local.get $count)))
        (v128.store (local.get $lane)
          (v128.xor (v128.load (local.get $p))
            (if (result v128) (local.get $off)
              (then (v128.load (i32.sub (local.get $p) (i32.const 16))))
              (else (v128.load (local.get $ivs))))))
        (local.set $lane (i32.add (local.get $lane) (i32.const 16)))
        (local.set $ivs (i32.add (local.get $ivs) (i32.const 16)))
        (local.set $p (i32.add (local.get $p) (local.get $ss)))
        (local.set $s (i32.add (local.get $s) (i32.const 1)))
        (br $sector))))
  (func (export "cbcscatter") (param $data i32) (param $lane i32) (param $count i32) (param $ss i32) (param $off i32)
    (local $s i32) (local $p i32)
    (local.set $p (i32.add (local.get $data) (local.get $off)))
    (block $done
      (loop $sector
        (br_if $done (i32.ge_u (local.get $s) (local.get $count)))
        (v128.store (local.get $p) (v128.load (local.get $lane)))
        (local.set $lane (i32.add (local.get $lane) (i32.const 16)))
        (local.set $p (i32.add (local.get $p) (local.get $ss)))
        (local.set $s (i32.add (local.get $s) (i32.const 1)))
        (br $sector)))))
